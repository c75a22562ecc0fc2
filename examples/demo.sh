#!/usr/bin/env bash
# Deploys the example app to a throwaway local test host and prints its /health response.
#
# Usage (as root, from anywhere in the repository):
#   examples/demo.sh          boot the demo host at 127.0.0.2 if it is not running, run
#                             `cargo run --release -- push demo`, print GET /health
#   examples/demo.sh --stop   stop the demo host
#
# The host keeps running after a push, so pushing again shows a new release going live. Its
# files live in memory (an nspawn overlay), so stopping it discards every release.
#
# Needs root, systemd-nspawn, mmdebstrap, the OpenSSH client and curl; the first run builds the
# test-host rootfs (tests/support/testhost rootfs), which takes under a minute. Generated files
# go to .crucible-demo/ at the repository root, which ignores itself in git: a test-only client
# key, the known_hosts file that pins the host's key, and the host's console log.
set -euo pipefail

address=127.0.0.2
app_port=8000

repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo_dir=$repository/.crucible-demo
testhost=$repository/tests/support/testhost
pid_file=$demo_dir/host.pid

fail() {
    echo "demo: $*" >&2
    exit 1
}

# Checks the process name too, so a pid that the kernel has since reused is not mistaken
# for the host.
is_host_running() {
    [[ -f $pid_file ]] && [[ $(cat "/proc/$(cat "$pid_file")/comm" 2>/dev/null) == systemd-nspawn ]]
}

stop_host() {
    if ! is_host_running; then
        echo "demo: no demo host is running"
        rm -f "$pid_file"
        return
    fi
    local pid
    pid=$(cat "$pid_file")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        fail "demo host (pid $pid) did not stop within 10 s; kill it with: $testhost force-stop $pid"
    fi
    rm -f "$pid_file"
    echo "demo: stopped the demo host at $address"
}

write_client_files() {
    mkdir -p "$demo_dir"
    echo '*' >"$demo_dir/.gitignore"
    if [[ ! -f $demo_dir/id_ed25519 ]]; then
        ssh-keygen -q -t ed25519 -N '' -C crucible-demo -f "$demo_dir/id_ed25519"
    fi
    echo "$address $("$testhost" host-key)" >"$demo_dir/known_hosts"
}

ssh_to_host() {
    ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes \
        -o UserKnownHostsFile="$demo_dir/known_hosts" -o IdentitiesOnly=yes -o ConnectTimeout=5 \
        -i "$demo_dir/id_ed25519" "root@$address" "$@" </dev/null
}

boot_host() {
    if is_host_running; then
        echo "demo: reusing the demo host at $address (pid $(cat "$pid_file"))"
        return
    fi
    if (exec 3<>"/dev/tcp/$address/22") 2>/dev/null; then
        fail "something already listens on $address:22, and it is not a demo host that this checkout booted; stop it, or set another loopback address in \$address at the top of examples/demo.sh and in [hosts.demo] in hosts.toml"
    fi

    echo "demo: booting a test host at $address"
    # setsid puts the host in its own session, so Ctrl-C in this terminal leaves it running.
    # In a script without job control, setsid execs without forking, so $! is the nspawn pid.
    CRUCIBLE_TESTHOST_RUNTIME_DIR=$demo_dir/host \
        setsid "$testhost" boot crucible-demo "$address" "$demo_dir/id_ed25519.pub" \
        >"$demo_dir/console.log" 2>&1 </dev/null &
    echo $! >"$pid_file"

    for _ in $(seq 1 300); do
        if ssh_to_host true 2>/dev/null; then
            return
        fi
        # Until testhost execs systemd-nspawn the process is still named testhost, so only
        # its existence is checked here.
        kill -0 "$(cat "$pid_file")" 2>/dev/null ||
            fail "the demo host stopped during boot; see $demo_dir/console.log"
        sleep 0.1
    done
    fail "the demo host did not accept ssh within 30 s; see $demo_dir/console.log"
}

print_health() {
    for _ in $(seq 1 50); do
        if curl --silent --fail --max-time 2 "http://$address:$app_port/health"; then
            echo
            return
        fi
        sleep 0.2
    done
    fail "GET http://$address:$app_port/health failed for 10 s; to see why, log in with
    ssh -i $demo_dir/id_ed25519 -o UserKnownHostsFile=$demo_dir/known_hosts root@$address
and run: journalctl -u webapp"
}

main() {
    [[ $(id -u) == 0 ]] || fail "must run as root because test hosts boot with systemd-nspawn; rerun with sudo"
    case ${1:-} in
        --stop)
            stop_host
            return
            ;;
        "") ;;
        *) fail "unknown argument '$1'; expected no argument or --stop" ;;
    esac

    write_client_files
    boot_host

    cd "$repository"
    cargo run --release -- push demo
    echo "demo: GET http://$address:$app_port/health returned:"
    print_health
    echo "demo: the host is still running; stop it with: examples/demo.sh --stop"
}

main "$@"
