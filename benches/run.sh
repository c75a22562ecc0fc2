#!/usr/bin/env bash
# Times crucible against a plain `tar | ssh` copy and a Capistrano deploy of the same app on a local
# test host.
#
# Usage (as root, from anywhere in the repository):
#   benches/run.sh [--reps N] [--skip-large] [--profile]
#
#   --reps N       repetitions of each case (default 5)
#   --skip-large   skip the client memory measurement with a 1 GB app (about a minute)
#   --profile      also record a perf profile of the client during a delta-off push
#
# CRUCIBLE_BENCH_BINARY=PATH times that crucible binary instead of building this checkout, to
# compare two builds under the same script.
#
# Builds crucible with `cargo build --release` and generates a seeded fixture app: about 3,000
# files and 40 MB of python-like source and random blobs around examples/webapp. Then it boots a
# test host at 127.0.0.3 with tests/support/testhost and runs, in each repetition and in this order:
#   floor      tar czf - -C app . | ssh host 'mkdir -p D && tar xzf - -C D', with a new D
#   cold       push with new requirements (a new venv) and delta off, like a first deploy
#   delta      push after a one-file change: the venv is reused and one file travels
#   capistrano `cap bench deploy` (Capistrano 3) of a commit that contains the same one-file
#              change. Git on the host fetches the commit from a bare repository there, `git
#              archive` unpacks a new release and `current` switches. Nothing restarts.
#   full       push after a one-file change with `delta = false`: every byte travels
#   unchanged  push of the same tree again: nothing to upload
#   rollback   crucible rollback
# then one pass of each push kind under strace, counting the client's connect() calls to port 22.
# Running the cases in turn keeps them comparable when the machine's speed drifts.
#
# Every file goes to target/bench/ (replaced at each run): runs.tsv, one JSON summary per run,
# results.md with medians and ratios, and perf-report.txt with --profile. The host is always
# stopped on exit.
#
# Needs root, systemd-nspawn, mmdebstrap, the OpenSSH client, python3, strace, GNU time
# (/usr/bin/time, Debian package `time`), git, Capistrano 3 (Debian package `capistrano`) and,
# for --profile, perf (Debian package linux-perf).
set -euo pipefail

reps=5
run_large=yes
run_profile=no
address=127.0.0.3
settle_ms=500

repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
testhost=$repository/tests/support/testhost
work=$repository/target/bench
crucible=${CRUCIBLE_BENCH_BINARY:-$repository/target/release/crucible}
host_pid=

# Options for every OpenSSH client run that reaches the host, git's included: this key only, the
# pinned host key, no prompts.
ssh_options=(-F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes
    -o "UserKnownHostsFile=$work/known_hosts" -o IdentitiesOnly=yes -o ConnectTimeout=5
    -i "$work/id_ed25519")

fail() {
    echo "bench: $*" >&2
    exit 1
}

parse_arguments() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            --reps)
                [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || fail "--reps needs a number from 1 to 99, got '${2:-}'"
                reps=$2
                shift 2
                ;;
            --skip-large) run_large=no; shift ;;
            --profile) run_profile=yes; shift ;;
            *) fail "unknown argument '$1'; expected --reps N, --skip-large or --profile" ;;
        esac
    done
}

check_tools() {
    [[ $(id -u) == 0 ]] || fail "must run as root because the test host boots with systemd-nspawn; rerun with sudo"
    local tool
    for tool in ssh ssh-keygen python3 strace cargo git; do
        command -v "$tool" >/dev/null || fail "$tool not found; install it and rerun"
    done
    command -v cap >/dev/null \
        || fail "cap (Capistrano 3) not found; install it with: apt-get install capistrano"
    [[ -x /usr/bin/time ]] || fail "/usr/bin/time not found; install it with: apt-get install time"
    if [[ $run_profile == yes ]]; then
        perf stat -e instructions true >/dev/null 2>&1 \
            || fail "perf cannot count instructions here; install linux-perf or drop --profile"
    fi
}

stop_host() {
    [[ -n $host_pid ]] || return 0
    kill -TERM "$host_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$host_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$host_pid" 2>/dev/null; then
        "$testhost" force-stop "$host_pid" || echo "bench: could not stop the test host (pid $host_pid)" >&2
    fi
    host_pid=
}

ssh_to_host() {
    ssh "${ssh_options[@]}" "root@$address" "$@"
}

boot_host() {
    if (exec 3<>"/dev/tcp/$address/22") 2>/dev/null; then
        fail "something already listens on $address:22; stop it first"
    fi
    ssh-keygen -q -t ed25519 -N '' -C crucible-bench -f "$work/id_ed25519"
    echo "$address $("$testhost" host-key)" >"$work/known_hosts"

    # setsid execs without forking in a script, so $! is the nspawn pid that SIGTERM stops.
    CRUCIBLE_TESTHOST_RUNTIME_DIR=$work/host \
        setsid "$testhost" boot crucible-bench "$address" "$work/id_ed25519.pub" \
        >"$work/console.log" 2>&1 </dev/null &
    host_pid=$!
    for _ in $(seq 1 300); do
        ssh_to_host true </dev/null 2>/dev/null && return
        kill -0 "$host_pid" 2>/dev/null || fail "the test host stopped during boot; see $work/console.log"
        sleep 0.1
    done
    fail "the test host did not accept ssh within 30 s; see $work/console.log"
}

write_hosts_toml() {
    local host_key
    host_key=$("$testhost" host-key)
    cat >"$work/hosts.toml" <<EOF
[app]
name = "webapp"
source = "app"
requirements = "requirements.txt"
unit = "webapp.service"
unit_file = "deploy/webapp.service"

[app.health]
settle = "${settle_ms}ms"

[hosts.bench]
address = "$address"
user = "root"
path = "/srv/webapp"
host_key = "$host_key"
identity = "id_ed25519"

[hosts.bench-full]
address = "$address"
user = "root"
path = "/srv/webapp"
host_key = "$host_key"
identity = "id_ed25519"
delta = false
EOF
    # A config of its own, because crucible validates all of hosts.toml and the large app exists
    # only while it is measured.
    sed -e 's/^source = "app"/source = "large"/' -e 's|/srv/webapp|/srv/large|' \
        "$work/hosts.toml" >"$work/hosts-large.toml"
}

# Writes a Capistrano 3 project into $work/capistrano that deploys the fixture app from the bare
# repository /srv/cap-repo.git on the host to /srv/cap-webapp, with no restart task.
write_capistrano_config() {
    mkdir -p "$work/capistrano/config/deploy"
    cat >"$work/capistrano/Capfile" <<'EOF'
require "capistrano/setup"
require "capistrano/deploy"
require "capistrano/scm/git"
install_plugin Capistrano::SCM::Git
EOF
    cat >"$work/capistrano/config/deploy.rb" <<'EOF'
set :application, "webapp"
set :repo_url, "/srv/cap-repo.git"
set :branch, "main"
set :deploy_to, "/srv/cap-webapp"
set :keep_releases, 5
EOF
    # net-ssh's counterparts of ssh_options: no ~/.ssh/config, this key only, no agent, strict
    # checking against the pinned known_hosts file, no prompts, a 5 s connect timeout.
    cat >"$work/capistrano/config/deploy/bench.rb" <<EOF
server "$address", user: "root", roles: %w[app]
set :ssh_options, {
  config: false,
  keys: ["$work/id_ed25519"],
  keys_only: true,
  use_agent: false,
  auth_methods: %w[publickey],
  user_known_hosts_file: "$work/known_hosts",
  verify_host_key: :always,
  non_interactive: true,
  timeout: 5,
}
EOF
}

# Runs git on the fixture app. The repository lives beside the tree, not in it, so crucible's
# pushes never see a .git directory.
app_git() {
    git -C "$work/app" --git-dir="$work/app.git" --work-tree="$work/app" \
        -c user.name=bench -c user.email=bench@localhost "$@"
}

# Commits PATH... and pushes the commit to the bare repository on the host. The push is the
# developer's `git push` to their forge, not part of a deploy, so it is never timed.
commit_and_push() {
    local message=$1
    shift
    app_git add -- "$@"
    app_git commit --quiet -m "$message"
    GIT_SSH_COMMAND="ssh ${ssh_options[*]@Q}" \
        app_git push --quiet "root@$address:/srv/cap-repo.git" main
}

deploy_with_capistrano() {
    local log=$work/capistrano/deploy-$1.log
    (cd "$work/capistrano" && cap bench deploy) >"$log" 2>&1 \
        || fail "cap bench deploy failed ($1); see $log"
}

# Puts the whole app in the host's bare repository and deploys it once, untimed, so the host's
# mirror clone and first release exist before the repetitions, as after crucible's warm-up push.
set_up_capistrano() {
    write_capistrano_config
    ssh_to_host "git init --quiet --bare --initial-branch=main /srv/cap-repo.git" </dev/null
    app_git init --quiet --initial-branch=main
    commit_and_push "fixture app" .
    deploy_with_capistrano warmup
}

now_ms() {
    echo $((${EPOCHREALTIME/./} / 1000))
}

# Appends one line to runs.tsv: case, repetition, wall milliseconds, peak RSS in KiB, JSON file.
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/runs.tsv"
}

# Times `cap bench deploy` of a commit whose only change is the delta case's one-file change.
run_capistrano() {
    local rep=$1 started elapsed
    commit_and_push "benchmark change $rep" "pkg/area_07/module_03/$delta_file"
    started=$(now_ms)
    deploy_with_capistrano "$rep"
    elapsed=$(($(now_ms) - started))
    record capistrano "$rep" "$elapsed" - -
}

run_floor() {
    local rep=$1 started elapsed
    started=$(now_ms)
    tar czf - -C "$work/app" . | ssh_to_host "mkdir -p /srv/floor/$rep && tar xzf - -C /srv/floor/$rep"
    elapsed=$(($(now_ms) - started))
    record floor "$rep" "$elapsed" - -
    # Only the copy is timed; removing it keeps the host's in-memory overlay small.
    ssh_to_host "rm -rf /srv/floor/$rep" </dev/null
}

# Runs crucible under GNU time and records its wall time, peak RSS and JSON summary.
run_crucible() {
    local name=$1 rep=$2 started elapsed rss json=$work/json/$1-$2.json
    shift 2
    started=$(now_ms)
    if ! /usr/bin/time -v -o "$work/time.txt" \
        "$crucible" --config "${crucible_config:-$work/hosts.toml}" "$@" --json >"$json.out" 2>"$work/json/$name-$rep.err"; then
        fail "crucible $* failed in case $name, repetition $rep; see $work/json/$name-$rep.err"
    fi
    elapsed=$(($(now_ms) - started))
    tail -n 1 "$json.out" >"$json"
    rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/time.txt")
    record "$name" "$rep" "$elapsed" "$rss" "json/$name-$rep.json"
}

# Changes one source file, so the next push sends exactly one changed file.
change_one_file() {
    echo "# benchmark change $1" >>"$work/app/pkg/area_07/module_03/$2"
}

run_repetition() {
    local rep=$1
    run_floor "$rep"

    # A new comment changes the requirements' hash, so the venv key is new and a venv is built.
    sed -i "1s/.*/# benchmark requirements $rep/" "$work/app/requirements.txt"
    run_crucible cold "$rep" push bench-full

    change_one_file "$rep" "$delta_file"
    run_crucible delta "$rep" push bench
    run_capistrano "$rep"

    change_one_file "$rep" "$full_file"
    run_crucible full "$rep" push bench-full

    run_crucible unchanged "$rep" push bench
    run_crucible rollback "$rep" rollback bench
}

# Counts the connect() calls to port 22 that one run of each kind makes.
count_connections() {
    local name=$1 trace=$work/strace-$1.txt
    shift
    strace -f -qq -e trace=connect -o "$trace" \
        "$crucible" --config "$work/hosts.toml" "$@" --json >/dev/null 2>&1 \
        || fail "crucible $* failed under strace; see $trace"
    printf '%s\t%s\n' "$name" "$(grep -c 'sin_port=htons(22)' "$trace" || true)" >>"$work/connections.tsv"
}

census() {
    sed -i "1s/.*/# benchmark requirements census/" "$work/app/requirements.txt"
    count_connections cold push bench-full
    change_one_file census "$delta_file"
    count_connections delta push bench
    change_one_file census "$full_file"
    count_connections full push bench-full
    count_connections unchanged push bench
    count_connections rollback rollback bench
}

measure_large_app() {
    echo "bench: generating the 1 GB app"
    python3 "$repository/benches/fixture.py" "$work/large" "$repository/examples/webapp" --large
    crucible_config=$work/hosts-large.toml run_crucible large 1 push bench-full
    rm -rf "$work/large"
    ssh_to_host "rm -rf /srv/large" </dev/null
}

record_profile() {
    change_one_file profile "$full_file"
    # Without frame pointers in the release build, call graphs would be guesses: a flat profile.
    perf record -F 999 -o "$work/perf.data" -- \
        "$crucible" --config "$work/hosts.toml" push bench-full --json >/dev/null 2>"$work/perf-record.err"
    perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null \
        | grep -v -e '^#' -e '^$' | head -n 40 >"$work/perf-report.txt" || true
    perf report -i "$work/perf.data" --no-children --sort dso --stdio 2>/dev/null \
        | grep -v -e '^#' -e '^$' >"$work/perf-dso.txt" || true
}

main() {
    parse_arguments "$@"
    check_tools
    if [[ -z ${CRUCIBLE_BENCH_BINARY:-} ]]; then
        (cd "$repository" && cargo build --release --quiet)
    fi
    [[ -x $crucible ]] || fail "crucible binary $crucible not found or not executable"

    rm -rf "$work"
    mkdir -p "$work/json"
    trap stop_host EXIT

    echo "bench: generating the fixture app"
    python3 "$repository/benches/fixture.py" "$work/app" "$repository/examples/webapp"
    local sources=("$work"/app/pkg/area_07/module_03/*.py)
    delta_file=$(basename "${sources[0]}")
    full_file=$(basename "${sources[-1]}")
    write_hosts_toml
    echo "bench: booting the test host at $address"
    boot_host

    # Warm-up, not counted: fills the page cache and puts a first release and venv on the host.
    tar czf - -C "$work/app" . | ssh_to_host "mkdir -p /srv/floor/warmup && tar xzf - -C /srv/floor/warmup"
    ssh_to_host "rm -rf /srv/floor" </dev/null
    run_crucible first 0 push bench
    set_up_capistrano

    for rep in $(seq 1 "$reps"); do
        echo "bench: repetition $rep of $reps"
        run_repetition "$rep"
    done
    echo "bench: counting connections"
    census
    [[ $run_large == yes ]] && measure_large_app
    [[ $run_profile == yes ]] && record_profile
    stop_host

    python3 "$repository/benches/summarize.py" "$work" "$settle_ms" | tee "$work/results.md"
}

main "$@"
