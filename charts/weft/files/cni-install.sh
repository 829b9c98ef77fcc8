#!/bin/sh
# Installs Weft's chained CNI plugin on this node, keeps it installed, and
# takes it out again. It runs in the ztunnel pod (see the DaemonSet) with the
# host's CNI directories mounted, and needs only a POSIX sh, sed, cp, chmod,
# mv, rm and sleep: no jq, so any base image with a shell will do.
#
#   cni-install.sh preflight  check the host mounts ztunnel relies on
#   cni-install.sh install    copy weft-cni into the CNI bin dir, add it to
#                             the end of the primary conflist's plugin chain,
#                             and put both back whenever they disappear (a
#                             primary CNI may rewrite its conflist at will)
#   cni-install.sh once       one pass of install, then exit (for tests)
#   cni-install.sh remove     take the entry out of every conflist and delete
#                             the binary (used by `ztunnel.uninstall=true`)
#
# The primary conflist is the one the container runtime loads: the first
# *.conf, *.conflist or *.json in the conf dir by name (or WEFT_CNI_CONF_NAME).
# Editing it is idempotent: other plugins keep their text as it was, our entry
# is replaced, and the file is only rewritten (atomically) when it changes.
set -eu

BIN_SRC=${WEFT_CNI_BIN_SRC:-/usr/local/bin/weft-cni}
BIN_DIR=${WEFT_CNI_BIN_DIR:-/host/opt/cni/bin}
CONF_DIR=${WEFT_CNI_CONF_DIR:-/host/etc/cni/net.d}
CONF_NAME=${WEFT_CNI_CONF_NAME:-}
SOCKET=${WEFT_CNI_SOCKET:-/var/run/weft/cni.sock}
INTERVAL=${WEFT_CNI_RECONCILE_SECONDS:-10}
BPFFS=${WEFT_BPFFS:-/sys/fs/bpf}
CGROUP_ROOT=${WEFT_CGROUP_ROOT:-/host/sys/fs/cgroup}
MOUNTINFO=${WEFT_MOUNTINFO:-/proc/self/mountinfo}

ENTRY="{\"type\":\"weft-cni\",\"ztunnel_socket\":\"$SOCKET\"}"

log() { printf 'weft-cni-install: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# The conflist the runtime uses, or nothing while the primary CNI has not
# written one yet.
primary_conf() {
	if [ -n "$CONF_NAME" ]; then
		if [ -f "$CONF_DIR/$CONF_NAME" ]; then printf '%s\n' "$CONF_DIR/$CONF_NAME"; fi
		return 0
	fi
	for f in "$CONF_DIR"/*; do
		case $f in *.conf | *.conflist | *.json) ;; *) continue ;; esac
		if [ -f "$f" ]; then
			printf '%s\n' "$f"
			return 0
		fi
	done
}

# Whether a plugin object (raw JSON text) is ours.
is_weft() {
	[ -n "$(printf '%s\n' "$1" | sed -n 's/[[:space:]]//g; /"type":"weft-cni"/p')" ]
}

# rewrite DOCUMENT install|remove: prints DOCUMENT with our entry appended to
# (or dropped from) the top-level "plugins" array. Returns 2 when there is no
# such array (a single-plugin .conf), 3 when the chain has no other plugin.
rewrite() {
	rest=$1
	mode=$2
	head=''
	elem=''
	kept=''
	last=''
	depth=0
	instr=0
	esc=0
	str=''
	key=''
	inbody=0
	while [ -n "$rest" ]; do
		c=${rest%"${rest#?}"}
		rest=${rest#?}
		if [ "$instr" = 1 ]; then
			if [ "$esc" = 1 ]; then
				esc=0
			elif [ "$c" = '\' ]; then
				esc=1
			elif [ "$c" = '"' ]; then
				instr=0
				if [ "$inbody" = 0 ] && [ "$depth" = 1 ]; then key=$str; fi
			else
				str=$str$c
			fi
		else
			case $c in
			'"')
				instr=1
				str=''
				;;
			'{' | '[')
				depth=$((depth + 1))
				if [ "$inbody" = 0 ] && [ "$c" = '[' ] && [ "$depth" = 2 ] && [ "$key" = plugins ]; then
					head=$head$c
					inbody=1
					continue
				fi
				;;
			'}' | ']')
				depth=$((depth - 1))
				if [ "$inbody" = 1 ] && [ "$depth" = 1 ]; then
					last=$elem
					if ! is_weft "$elem"; then kept=${kept:+$kept,}$elem; fi
					break
				fi
				;;
			',')
				if [ "$inbody" = 1 ] && [ "$depth" = 2 ]; then
					if ! is_weft "$elem"; then kept=${kept:+$kept,}$elem; fi
					elem=''
					continue
				fi
				;;
			esac
		fi
		if [ "$inbody" = 1 ]; then elem=$elem$c; else head=$head$c; fi
	done
	[ "$inbody" = 1 ] || return 2
	case $kept in *[![:space:]]*) ;; *) return 3 ;; esac
	# The whitespace before the closing bracket stays where it was, so a
	# second run produces the same text and a removal restores the original.
	trail=${last##*[![:space:]]}
	kept=${kept%"${kept##*[![:space:]]}"}
	if [ "$mode" = install ]; then
		printf '%s%s,\n    %s%s]%s\n' "$head" "$kept" "$ENTRY" "$trail" "$rest"
	else
		printf '%s%s%s]%s\n' "$head" "$kept" "$trail" "$rest"
	fi
}

# edit_conf FILE install|remove: rewrites FILE in place if it changes.
edit_conf() {
	old=$(cat "$1")
	set +e
	new=$(rewrite "$old" "$2")
	rc=$?
	set -e
	case $rc in
	0) ;;
	2)
		if [ "$2" = remove ]; then return 0; fi
		die "$1 has no \"plugins\" list: weft-cni is a chained plugin and needs a .conflist (convert the primary CNI's config, or set cni.confName to its conflist)"
		;;
	3)
		if [ "$2" = remove ]; then return 0; fi
		die "$1 has no plugin to chain weft-cni after"
		;;
	*) die "cannot parse $1" ;;
	esac
	if [ "$new" = "$old" ]; then return 0; fi
	tmp="$CONF_DIR/.weft-cni.tmp"
	printf '%s\n' "$new" >"$tmp"
	mv -f "$tmp" "$1"
	log "$2: updated $1"
}

install_binary() {
	[ -x "$BIN_SRC" ] || die "$BIN_SRC is missing from the image"
	tmp="$BIN_DIR/.weft-cni.tmp"
	cp "$BIN_SRC" "$tmp"
	chmod 0755 "$tmp"
	mv -f "$tmp" "$BIN_DIR/weft-cni"
	log "installed $BIN_DIR/weft-cni"
}

# mounted PATH FSTYPE: whether PATH is a mount point of FSTYPE.
mounted() {
	[ -n "$(sed -n "s|^[0-9]* [0-9]* [^ ]* [^ ]* $1 .* - $2 .*|x|p" "$MOUNTINFO")" ]
}

preflight() {
	# Pins must land on the host's bpffs: one mounted only inside this
	# container would vanish with it, and the capture programs with it.
	mounted "$BPFFS" bpf ||
		die "$BPFFS is not a bpf filesystem on this node: mount one on the host (mount -t bpf bpf /sys/fs/bpf, or systemd's sys-fs-bpf.mount) so Weft's pinned programs outlive the ztunnel pod"
	mounted "$CGROUP_ROOT" cgroup2 || mounted "$CGROUP_ROOT/unified" cgroup2 ||
		die "no cgroup v2 hierarchy at $CGROUP_ROOT or $CGROUP_ROOT/unified: Weft attaches its connect programs to the node's cgroup v2 root"
	log "preflight ok: bpffs at $BPFFS, cgroup v2 under $CGROUP_ROOT"
}

install_once() {
	[ -x "$BIN_DIR/weft-cni" ] || install_binary
	conf=$(primary_conf)
	if [ -z "$conf" ]; then
		log "no CNI config in $CONF_DIR yet; waiting for the primary CNI"
		return 0
	fi
	edit_conf "$conf" install
}

case ${1:-install} in
preflight)
	preflight
	;;
install)
	trap 'log "stopping; the chained entry stays (pods wait for the next ztunnel rather than start uncaptured)"; exit 0' TERM INT
	install_binary
	while :; do
		install_once
		sleep "$INTERVAL" &
		wait $!
	done
	;;
once)
	install_binary
	install_once
	;;
remove)
	for f in "$CONF_DIR"/*; do
		case $f in *.conf | *.conflist | *.json) ;; *) continue ;; esac
		if [ -f "$f" ]; then edit_conf "$f" remove; fi
	done
	rm -f "$BIN_DIR/weft-cni" "$BIN_DIR/.weft-cni.tmp"
	log "removed weft-cni from $CONF_DIR and $BIN_DIR"
	if [ "${2:-}" = --wait ]; then
		trap 'exit 0' TERM INT
		while :; do
			sleep 3600 &
			wait $!
		done
	fi
	;;
*) die "usage: $0 preflight | install | once | remove [--wait]" ;;
esac
