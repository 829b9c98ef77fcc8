#!/bin/sh
# Tests for files/cni-install.sh against conflists shaped like real primary
# CNIs' (multi-line with nested arrays, one-line, strings holding brackets and
# escaped quotes). Run by `cargo xtask test`; needs sh, sed and python3 (for
# checking that the results are JSON with weft-cni last in the chain).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
script="$here/../files/cni-install.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0
passed=0

fail() {
	printf 'FAIL %s: %s\n' "$current" "$*" >&2
	failures=$((failures + 1))
}

setup_node() {
	rm -rf "$work/node"
	mkdir -p "$work/node/bin" "$work/node/net.d" "$work/node/src"
	printf '#!/bin/sh\necho weft-cni\n' >"$work/node/src/weft-cni"
	chmod 0755 "$work/node/src/weft-cni"
}

run_script() {
	WEFT_CNI_BIN_SRC="$work/node/src/weft-cni" \
		WEFT_CNI_BIN_DIR="$work/node/bin" \
		WEFT_CNI_CONF_DIR="$work/node/net.d" \
		WEFT_CNI_SOCKET="${SOCKET:-/var/run/weft/cni.sock}" \
		WEFT_MOUNTINFO="$work/mountinfo" \
		sh "$script" "$@" 2>"$work/stderr"
}

# chain FILE: the plugin types in order, comma-separated (fails on bad JSON).
chain() {
	python3 -c 'import json,sys; print(",".join(p["type"] for p in json.load(open(sys.argv[1]))["plugins"]))' "$1"
}

check_round_trip() {
	conf="$work/node/net.d/$1"
	want=$2
	cp "$conf" "$work/original"
	run_script once || fail "install failed: $(cat "$work/stderr")"
	[ -x "$work/node/bin/weft-cni" ] || fail "binary not installed"
	got=$(chain "$conf") || fail "not JSON after install: $(cat "$conf")"
	[ "$got" = "$want" ] || fail "chain after install is $got, want $want"
	cp "$conf" "$work/installed"
	run_script once || fail "second install failed: $(cat "$work/stderr")"
	cmp -s "$conf" "$work/installed" || fail "second install changed the file: $(cat "$conf")"
	run_script remove || fail "remove failed: $(cat "$work/stderr")"
	cmp -s "$conf" "$work/original" || fail "remove did not restore the original: $(cat "$conf")"
	[ ! -e "$work/node/bin/weft-cni" ] || fail "remove left the binary"
}

test_case() {
	current=$1
	before=$failures
	setup_node
	"$@"
	if [ "$failures" = "$before" ]; then passed=$((passed + 1)); fi
}

kindnet() {
	cat >"$work/node/net.d/10-kindnet.conflist" <<'EOF'
{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [
				{ "dst": "0.0.0.0/0" }
			],
			"ranges": [
				[ { "subnet": "10.244.0.0/24" } ]
			]
		}
		,
		"mtu": 1500
	},
	{
		"type": "portmap",
		"capabilities": {
			"portMappings": true
		}
	}
	]
}
EOF
	check_round_trip 10-kindnet.conflist ptp,portmap,weft-cni
}

one_line_and_tricky_strings() {
	printf '%s\n' '{"cniVersion":"1.0.0","name":"x [y]","plugins":[{"type":"bridge","note":"a \"quoted\" ] and } and \\"},{"type":"tuning","plugins":["nested"]}],"after":"ok"}' \
		>"$work/node/net.d/05-tricky.conflist"
	check_round_trip 05-tricky.conflist bridge,tuning,weft-cni
	python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["after"]=="ok" and d["name"]=="x [y]"' \
		"$work/node/net.d/05-tricky.conflist" || fail "other keys changed"
}

picks_first_config_by_name() {
	printf '{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"b"}]}\n' >"$work/node/net.d/20-b.conflist"
	printf '{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"}]}\n' >"$work/node/net.d/10-a.conflist"
	printf 'not a config\n' >"$work/node/net.d/00-readme.txt"
	run_script once || fail "install failed: $(cat "$work/stderr")"
	[ "$(chain "$work/node/net.d/10-a.conflist")" = a,weft-cni ] || fail "10-a.conflist not chained"
	[ "$(chain "$work/node/net.d/20-b.conflist")" = b ] || fail "20-b.conflist touched"
	for f in "$work/node/net.d"/.weft*; do [ ! -e "$f" ] || fail "left a temp file $f"; done
}

replaces_a_stale_entry() {
	printf '{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"},{ "type" : "weft-cni", "ztunnel_socket": "/old.sock"},{"type":"z"}]}\n' \
		>"$work/node/net.d/10-a.conflist"
	run_script once || fail "install failed: $(cat "$work/stderr")"
	[ "$(chain "$work/node/net.d/10-a.conflist")" = a,z,weft-cni ] || fail "chain is $(chain "$work/node/net.d/10-a.conflist")"
	grep -q '/var/run/weft/cni.sock' "$work/node/net.d/10-a.conflist" || fail "socket not updated"
	! grep -q '/old.sock' "$work/node/net.d/10-a.conflist" || fail "stale entry kept"
}

refuses_a_single_plugin_conf() {
	printf '{"cniVersion":"0.4.0","name":"single","type":"bridge"}\n' >"$work/node/net.d/10-single.conf"
	cp "$work/node/net.d/10-single.conf" "$work/original"
	if run_script once; then fail "install into a .conf succeeded"; fi
	grep -q 'needs a .conflist' "$work/stderr" || fail "unclear message: $(cat "$work/stderr")"
	run_script remove || fail "remove failed on a .conf: $(cat "$work/stderr")"
	cmp -s "$work/node/net.d/10-single.conf" "$work/original" || fail ".conf changed"
}

waits_for_the_primary_cni() {
	run_script once || fail "install with no config failed: $(cat "$work/stderr")"
	grep -q 'waiting for the primary CNI' "$work/stderr" || fail "no waiting message"
	[ -x "$work/node/bin/weft-cni" ] || fail "binary not installed"
}

preflight_checks_host_mounts() {
	cat >"$work/mountinfo" <<'EOF'
25 1 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
41 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
42 25 0:36 / /host/sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw
EOF
	run_script preflight || fail "preflight failed: $(cat "$work/stderr")"
	sed -i '/ bpf bpf /d' "$work/mountinfo"
	if run_script preflight; then fail "preflight passed without bpffs"; fi
	grep -q 'not a bpf filesystem' "$work/stderr" || fail "unclear message: $(cat "$work/stderr")"
}

test_case kindnet
test_case one_line_and_tricky_strings
test_case picks_first_config_by_name
test_case replaces_a_stale_entry
test_case refuses_a_single_plugin_conf
test_case waits_for_the_primary_cni
test_case preflight_checks_host_mounts

if [ "$failures" != 0 ]; then
	printf 'cni-install.sh tests: %d failure(s), %d case(s) ok\n' "$failures" "$passed" >&2
	exit 1
fi
printf 'cni-install.sh tests: all %d cases ok\n' "$passed"

