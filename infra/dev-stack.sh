#!/usr/bin/env bash
# Local dev stack on loopback: a Prefect server (SQLite), the process work pool `fmbseg-process`
# with one worker and fmbseg's deployments, and an S3 endpoint (moto) with a bucket.
#
#   infra/dev-stack.sh start     # start everything (idempotent), deploy, print how to use it
#   infra/dev-stack.sh env       # the exports only:  eval "$(infra/dev-stack.sh env)"
#   infra/dev-stack.sh status
#   infra/dev-stack.sh stop      # stop everything; `stop --purge` also deletes the state dir
#
# Settings (environment): PREFECT_PORT (4200), S3_PORT (5000), FMBSEG_POOL (fmbseg-process),
# FMBSEG_BUCKET (fmbseg), FMBSEG_DEV_DIR (state: DB, logs, pids; default under /tmp),
# FMBSEG_BIN (folder with prefect, moto_server, python; default .venv/bin, else PATH).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${FMBSEG_DEV_DIR:-${TMPDIR:-/tmp}/fmbseg-dev-stack-$(id -u)}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
S3_PORT="${S3_PORT:-5000}"
POOL="${FMBSEG_POOL:-fmbseg-process}"
BUCKET="${FMBSEG_BUCKET:-fmbseg}"
DEPLOYMENTS=(default smoke)
if [[ -n "${FMBSEG_BIN:-}" ]]; then
    BIN="$FMBSEG_BIN"
elif [[ -x "$REPO/.venv/bin/prefect" ]]; then
    BIN="$REPO/.venv/bin"
else
    BIN="$(dirname "$(command -v prefect)")"
fi
API_URL="http://127.0.0.1:${PREFECT_PORT}/api"
S3_URL="http://127.0.0.1:${S3_PORT}"

# Every process started here (and the flow runs the worker starts) sees these.
export PREFECT_HOME="$STATE/prefect"
export PREFECT_API_URL="$API_URL"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

log() { printf 'dev-stack: %s\n' "$*" >&2; }

is_up() { # url -> 0 when it answers 2xx
    "$BIN/python" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2)
EOF
}

wait_up() { # name url seconds logfile
    local i
    for ((i = 0; i < $3 * 2; i++)); do
        if is_up "$2"; then return 0; fi
        sleep 0.5
    done
    log "$1 did not come up at $2 within $3 s; last lines of $4:"
    tail -n 20 "$4" >&2 || true
    return 1
}

running() { # name -> 0 when its recorded process is alive
    local pidfile="$STATE/$1.pid"
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

launch() { # name command... : a new session (so stop can end its process group), logged
    local name="$1"
    shift
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo "$!" >"$STATE/$name.pid"
}

start_s3() {
    if is_up "$S3_URL/"; then
        log "S3 endpoint already answering at $S3_URL"
    else
        launch s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
        wait_up "S3 (moto)" "$S3_URL/" 30 "$STATE/s3.log"
    fi
    "$BIN/python" - "$S3_URL" "$BUCKET" <<'EOF'
import sys, boto3
url, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url)
if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
    s3.create_bucket(Bucket=bucket)
EOF
    log "S3 endpoint $S3_URL, bucket s3://$BUCKET"
}

start_prefect() {
    if is_up "$API_URL/health"; then
        log "Prefect server already answering at $API_URL"
    else
        launch server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
        wait_up "Prefect server" "$API_URL/health" 120 "$STATE/server.log"
    fi
    if ! "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1; then
        "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
    fi
    local name
    for name in "${DEPLOYMENTS[@]}"; do
        # prefect 3.8.8 + fastapi >= 0.151: `deploy` saves the deployment, then fails on a
        # 422 while listing online workers; so check the result, not the exit status.
        (cd "$REPO" && "$BIN/prefect" --no-prompt deploy -n "$name") >"$STATE/deploy-$name.log" 2>&1 || true
        if ! "$BIN/prefect" deployment inspect "annotate-and-train/$name" >/dev/null 2>&1; then
            log "deploying $name failed; see $STATE/deploy-$name.log"
            return 1
        fi
    done
    if running worker; then
        log "worker already running (pid $(cat "$STATE/worker.pid"))"
    else
        # the worker runs flows from the repository root (the deployments' working directory)
        (cd "$REPO" && launch worker "$BIN/prefect" worker start --pool "$POOL")
    fi
    log "Prefect UI/API $API_URL, pool $POOL, deployments: ${DEPLOYMENTS[*]}"
}

print_env() {
    cat <<EOF
export PREFECT_API_URL=$API_URL
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
EOF
}

print_usage() {
    local so="{\"client_kwargs\": {\"endpoint_url\": \"$S3_URL\"}}"
    cat <<EOF

# in your shell:
$(print_env)

# the pipeline from the CLI, store on the local S3 endpoint (tiny random-weight models):
fmbseg run --config tiny --store s3://$BUCKET/store --storage-option client_kwargs.endpoint_url=$S3_URL

# the same through the server + worker (images: a local folder or an s3:// prefix):
prefect deployment run annotate-and-train/smoke -p images=/path/to/photos \\
    -p store=s3://$BUCKET/store -p storage_options='$so'

# runs and logs: http://127.0.0.1:$PREFECT_PORT   stop: infra/dev-stack.sh stop
EOF
}

stop_one() { # name
    local pidfile="$STATE/$1.pid" pid i
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
        log "stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile"
}

status() {
    local name
    for name in server worker s3; do
        if running "$name"; then
            echo "$name: running (pid $(cat "$STATE/$name.pid"), log $STATE/$name.log)"
        else
            echo "$name: stopped"
        fi
    done
}

case "${1:-}" in
    start)
        mkdir -p "$STATE" "$PREFECT_HOME"
        start_s3
        start_prefect
        print_usage
        ;;
    env) print_env ;;
    status) status ;;
    stop)
        for name in worker server s3; do stop_one "$name"; done
        if [[ "${2:-}" == "--purge" ]]; then
            rm -rf "$STATE"
            log "removed $STATE"
        fi
        ;;
    *)
        echo "usage: $0 start|env|status|stop [--purge]" >&2
        exit 2
        ;;
esac
