# Argument parsing shared by start_head.sh and start_worker.sh (sourced, not run).
#
#   parse_ray_args NAME "--flag ..." "$@"
#
# Accepts the value flags listed in the second argument (each sets the variable of its
# name without dashes, `-` -> `_`: --dashboard-host sets dashboard_host; the caller sets
# defaults first), --labels (-> `resources`, a `ray start --resources` JSON), --num-cpus
# and --num-gpus (passed on to `ray start`) and `--` (everything after it is passed on).
# Flags passed on are collected in the array `extra`. Bad input exits 2 with a message
# that starts with NAME. LABEL_EXAMPLE (set by the caller) is the label its errors suggest.

parse_ray_args() {
  local name=$1 accepted=" $2 " flag
  shift 2
  extra=() labels=""
  while [[ $# -gt 0 ]]; do
    flag=$1
    case "$flag" in
      --) shift; extra+=("$@"); break ;;
    esac
    if [[ "$flag" == --labels || "$flag" == --num-cpus || "$flag" == --num-gpus || "$accepted" == *" $flag "* ]]; then
      if [[ $# -lt 2 ]]; then
        echo "$name: $flag needs a value; see the usage at the top of $0" >&2
        exit 2
      fi
      case "$flag" in
        --labels) labels=$2 ;;
        --num-cpus|--num-gpus) extra+=("$flag=$2") ;;
        *) local var=${flag#--}; printf -v "${var//-/_}" '%s' "$2" ;;
      esac
      shift 2
    else
      echo "$name: unknown argument '$flag'; see the usage at the top of $0" >&2
      exit 2
    fi
  done
  resources=$(_labels_to_resources "$name" "$labels") || exit 2
}

# "a,b" -> {"a": 1, "b": 1} (empty names skipped); names must be plain identifiers to
# match the config's cluster.*_node_label.
_labels_to_resources() {
  local name=$1 out="{" label
  local -a labels_list
  IFS=, read -ra labels_list <<< "$2"
  for label in "${labels_list[@]}"; do
    [[ -z "$label" ]] && continue
    if [[ ! "$label" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      echo "$name: label '$label' must be letters, digits and underscores (e.g. $LABEL_EXAMPLE)" >&2
      return 2
    fi
    if [[ "$out" != "{" ]]; then out+=", "; fi
    out+="\"$label\": 1"
  done
  echo "$out}"
}
