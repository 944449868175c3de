"""Generation: the vLLM engine adapter behind a small interface (`engines`)."""
