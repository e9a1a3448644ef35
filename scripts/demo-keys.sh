#!/usr/bin/env bash
# Creates the demo key set with the keymeter CLI, pushes it into the running demo Envoy
# and prints the demo keys. Called by scripts/run-demo.sh with KEYMETER_CLI,
# KEYMETER_API_URL, KEYMETER_ADMIN_URL and KEYMETER_ADMIN_TOKEN set.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
FILE=.tools/demo/keyset.json
CLI=$KEYMETER_CLI
export KEYMETER_ADMIN=$KEYMETER_ADMIN_URL

rm -f "$FILE"
"$CLI" keyset init --file "$FILE" --plan free --plan pro >/dev/null
# Plans are part of the key-set document; the CLI edits keys, people edit plans.
python3 - "$FILE" <<'PY'
import json, sys
path = sys.argv[1]
doc = json.load(open(path))
doc["plans"] = {
    "free": {
        "rate_limits": [{"name": "per-10s", "rate": 5, "per": "10s", "burst": 5}],
        "quotas": [{"name": "daily", "period": "day", "limit": 1000}],
    },
    "pro": {
        "rate_limits": [{"name": "per-second", "rate": 100, "per": "1s", "burst": 200}],
        "costs": [{"methods": ["POST"], "path_prefix": "/v1/reports", "cost": 10}],
    },
}
json.dump(doc, open(path, "w"), indent=2)
PY

field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
pro=$("$CLI" --json key create --file "$FILE" --consumer acme --plan pro --meta tier=gold)
free=$("$CLI" --json key create --file "$FILE" --consumer hobbyist --plan free)
"$CLI" keyset push --file "$FILE" >/dev/null

PRO_KEY=$(field key <<<"$pro")
FREE_KEY=$(field key <<<"$free")
cat <<TXT

Demo key set pushed (file: $FILE; it holds only hashes):
  acme     (plan pro, 100 req/s, burst 200):   $PRO_KEY
  hobbyist (plan free, 5 per 10 s, 1000/day):  $FREE_KEY

  curl -i -H 'x-api-key: $PRO_KEY' $KEYMETER_API_URL/v1/hello
  curl -i -H 'Authorization: Bearer $FREE_KEY' $KEYMETER_API_URL/partner/hello   # 6th call in 10 s: 429 (Bearer keys: key-only routes, see README)
  curl -i -u '$(cut -c4-15 <<<"$PRO_KEY"):$(cut -c17- <<<"$PRO_KEY")' $KEYMETER_API_URL/v1/hello   # Basic auth
  $CLI status --admin $KEYMETER_ADMIN_URL --token $KEYMETER_ADMIN_TOKEN
  $CLI usage --admin $KEYMETER_ADMIN_URL --token $KEYMETER_ADMIN_TOKEN
TXT
