"""Configuration: `schema` (the dataclasses, importable without OmegaConf) at the bottom;
`load` (YAML + overrides, validation) above the components it checks."""
