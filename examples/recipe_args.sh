# Sourced by the recipes' train.sh: their shared command line.
#   parse_recipe_args "$@"   with ALL=(recipe names) set; sets DRY (0/1), DEVICE (--cpu or
#   nothing) and NAMES (the recipes asked for, "all" expanded), or exits 2 with one line.
die() { echo "error: $*" >&2; exit 2; }

parse_recipe_args() {
  DRY=0
  DEVICE=()
  NAMES=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY=1 ;;
      --cpu) DEVICE=(--cpu) ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      -*) die "unknown option $1 (known: --cpu, --dry-run, --help)" ;;
      all) NAMES+=("${ALL[@]}") ;;
      *) NAMES+=("$1") ;;
    esac
    shift
  done
  [ ${#NAMES[@]} -gt 0 ] || die "no recipe given (one or more of: ${ALL[*]}, all)"
  local name
  for name in "${NAMES[@]}"; do
    case " ${ALL[*]} " in *" $name "*) ;; *) die "unknown recipe $name (known: ${ALL[*]}, all)" ;; esac
  done
}
