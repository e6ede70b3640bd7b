#!/bin/sh
# Create or update EMQX built-in-database accounts from fedmask credentials files (EXAMPLE ONLY:
# needs a running EMQX 5 and its REST API; not run in this repository's CI).
#
#   EMQX_API=https://broker-1.fleet.internal:18083 EMQX_API_KEY=... EMQX_API_SECRET=... \
#       provision_users.sh creds/*.credentials
#
# Each file holds `username:password` as written by `fedmask broker add-device --out FILE`.
# The JSON is assembled with printf: passwords must not contain '"' or '\' (generated ones never do).
set -eu

: "${EMQX_API:?set EMQX_API to the dashboard/API base URL}"
: "${EMQX_API_KEY:?set EMQX_API_KEY (an API key created in the EMQX dashboard)}"
: "${EMQX_API_SECRET:?set EMQX_API_SECRET}"
authn="$EMQX_API/api/v5/authentication/password_based%3Abuilt_in_database/users"

for file in "$@"; do
    line=$(head -n 1 "$file")
    user=${line%%:*}
    password=${line#*:}
    body=$(printf '{"user_id":"%s","password":"%s"}' "$user" "$password")
    # Update when the account exists, create otherwise.
    if curl -fsS -u "$EMQX_API_KEY:$EMQX_API_SECRET" -o /dev/null "$authn/$user"; then
        curl -fsS -u "$EMQX_API_KEY:$EMQX_API_SECRET" -X PUT -H 'Content-Type: application/json' \
            -d "$(printf '{"password":"%s"}' "$password")" "$authn/$user" > /dev/null
        echo "updated $user"
    else
        curl -fsS -u "$EMQX_API_KEY:$EMQX_API_SECRET" -X POST -H 'Content-Type: application/json' \
            -d "$body" "$authn" > /dev/null
        echo "created $user"
    fi
done
