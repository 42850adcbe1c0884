#!/usr/bin/env bash
# guide_snippets.sh GUIDE: every ```cpp block after a "<!-- from FILE -->" line of GUIDE must
# appear verbatim in FILE (relative to the repository root), so the guide cannot drift from the
# program that CI compiles and runs.
guide=$1
root=$(cd "$(dirname "$0")/.." && pwd)
status=0 checked=0 source="" in_block=0 block=""
while IFS= read -r line || [ -n "$line" ]; do
  if [ $in_block -eq 1 ]; then
    if [ "$line" = '```' ]; then
      in_block=0
      if [[ "$(cat "$root/$source")" != *"$block"* ]]; then
        echo "$guide: a snippet from $source is not in it (any more):"; echo "$block"; status=1
      fi
      checked=$((checked + 1)) source=""
    else
      block+="${block:+$'\n'}$line"
    fi
  elif [[ "$line" =~ ^\<!--\ from\ ([^ ]+)\ --\>$ ]]; then
    source=${BASH_REMATCH[1]}
  elif [ -n "$source" ] && [ "$line" = '```cpp' ]; then
    in_block=1 block=""
  fi
done <"$guide"
[ $checked -gt 0 ] || { echo "$guide: no snippets found"; exit 1; }
[ $status -eq 0 ] && echo "ok: $checked snippets of $guide found in their sources"
exit $status
