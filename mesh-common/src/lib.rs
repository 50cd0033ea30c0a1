//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so the byte layout the kernel
//! sees is the one user space writes. Addresses are always stored as 16 bytes: IPv4 as
//! an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one map serves both families.
//! Addresses are in network byte order (as the kernel hands them out), ports in host
//! byte order.
#![no_std]

/// `SO_MARK` set on every socket the agent opens. The `connect4/6` programs leave a
/// socket carrying it alone only when the calling process is the agent itself (its
/// thread group id is in [`settings::AGENT_TGID`]): a process in a pod that sets the
/// mark, even as root with CAP_NET_ADMIN, is captured like any other.
pub const BYPASS_MARK: u32 = 0x0004_d3a1;

/// Every port the agent listens on, in a pod or on the node. A tunnel CONNECT to one
/// of them is refused: the mesh's own ports are never a destination.
pub const MESH_PORTS: [u16; 5] = [
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    INBOUND_TUNNEL_PORT,
    METRICS_PORT,
    READINESS_PORT,
];

/// Outbound listener the agent holds inside each enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture (PERMISSIVE) inside each enrolled pod's network namespace.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound mTLS (HBONE) listener inside each enrolled pod's network namespace.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
/// Prometheus metrics, on the node.
pub const METRICS_PORT: u16 = 15020;
/// Readiness, on the node.
pub const READINESS_PORT: u16 = 15021;

/// Map names, one definition shared by the kernel object and the loader.
pub mod maps {
    /// netns cookie -> [`super::EnrolledNetns`]: network namespaces of enrolled pods,
    /// with the pod's inbound mode and own addresses. `connect4/6` capture in them,
    /// `sk_lookup` enforces the mode for every address of the namespace.
    pub const ENROLLED_NETNS: &str = "MESH_ENROLLED_NETNS";
    /// [`super::ServiceKey`] -> [`super::ServiceValue`]: mesh services (ClusterIP, port, proto).
    pub const SERVICES: &str = "MESH_SERVICES";
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) of a [`super::OrigDst`] on each
    /// captured socket: written by `connect4/6`, read by `getpeername4/6` and by
    /// `sock_ops` to fill [`PEER_ORIG_DST`]. It lives and dies with the socket, so it has
    /// no bound to share between pods.
    pub const SOCK_ORIG_DST: &str = "MESH_SOCK_ORIG_DST";
    /// [`super::PeerKey`] -> [`super::OrigDst`]: the same record, keyed by what the agent
    /// sees on the accepted socket (netns of the listener, client address and port).
    pub const PEER_ORIG_DST: &str = "MESH_PEER_ORIG_DST";
    /// Per-CPU counters, indexed by [`super::counters`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// [`super::ListenerKey`] (netns cookie, address family) -> the agent's plaintext
    /// listener (:15006) in that pod (SOCKHASH).
    pub const PLAINTEXT_LISTENERS: &str = "MESH_PLAINTEXT_LISTENERS";
    /// Ring buffer of [`super::FlowEvent`]s for `meshctl observe`.
    pub const EVENTS: &str = "MESH_EVENTS";
    /// [`super::SockKey`] -> socket (SOCKHASH): both ends of every pod-agent hop, so
    /// `sk_msg` can hand bytes straight to the other end (sockmap acceleration).
    pub const SOCKETS: &str = "MESH_SOCKETS";
    /// [`super::SockKey`] -> 1: sockets whose first message found no peer in
    /// [`SOCKETS`]; they stay on the TCP path for good, so bytes are never reordered.
    pub const SOCK_FALLBACK: &str = "MESH_SOCK_FALLBACK";
    /// [`super::SockKey`] -> the kernel address of that socket, written by `sock_ops`
    /// when the socket joins [`SOCKETS`]: `sk_msg` may not hold a reference to another
    /// socket, but it can name it for [`SOCK_UNREAD`].
    pub const SOCK_IDS: &str = "MESH_SOCK_IDS";
    /// Address of a receiving socket in [`SOCKETS`] -> [`super::SockFlow`]: bytes its
    /// peer sent that it has not read yet, and which path the peer is on.
    pub const SOCK_UNREAD: &str = "MESH_SOCK_UNREAD";
    /// Address of a sending socket in [`SOCKETS`] -> [`super::SockSending`]: what
    /// `sk_msg` charged during its sendmsg in progress, set right when it returns.
    pub const SOCK_SENDING: &str = "MESH_SOCK_SENDING";
    /// Array of u32 switches, indexed by [`super::settings`].
    pub const SETTINGS: &str = "MESH_SETTINGS";
    /// [`super::BackendKey`] -> [`super::BackendValue`]: the ready endpoints of each
    /// fail-open service port, for `connect4/6` to pick from while no agent serves the
    /// node (only fail-open services have entries).
    pub const BACKENDS: &str = "MESH_BACKENDS";
    /// Ring buffer of the programs' log records (aya-log's own map, by its name).
    pub const LOGS: &str = "AYA_LOGS";
    /// One u64: when the agent last said it serves (`CLOCK_MONOTONIC` ns, as
    /// `bpf_ktime_get_ns`). Older than [`super::HEARTBEAT_STALE_NS`]: no agent serves.
    pub const HEARTBEAT: &str = "MESH_HEARTBEAT";

    /// Every map of the object, for pinning, inspection and metrics.
    pub const ALL: [&str; 16] = [
        ENROLLED_NETNS,
        SERVICES,
        SOCK_ORIG_DST,
        PEER_ORIG_DST,
        COUNTERS,
        PLAINTEXT_LISTENERS,
        EVENTS,
        SOCKETS,
        SOCK_FALLBACK,
        SOCK_IDS,
        SOCK_UNREAD,
        SOCK_SENDING,
        SETTINGS,
        BACKENDS,
        HEARTBEAT,
        LOGS,
    ];
}

/// Indices into [`maps::SETTINGS`]; each slot is 0 (off) or 1 (on).
pub mod settings {
    /// sockmap acceleration of the pod-agent hops.
    pub const SOCKMAP: u32 = 0;
    /// Unread bytes a receiving socket may hold from `sk_msg` before its sender is
    /// held back: an application's socket moves to the TCP path, where the receive
    /// window pushes back, until the receiver has read everything; the agent's own
    /// socket waits. This is the sockmap's stand-in for a receive buffer.
    pub const SOCKMAP_UNREAD_LIMIT: u32 = 1;
    /// The agent's thread group id (its pid in the node's pid namespace). Only sockets
    /// that process connects are exempt from capture; a pod cannot take this id.
    pub const AGENT_TGID: u32 = 2;
    /// During a handover, the thread group of the agent handing over: it keeps
    /// relaying (and dialling for) the connections it carries until they end. 0
    /// otherwise. See [`super::connect_verdict`].
    pub const PREVIOUS_AGENT_TGID: u32 = 3;
    /// The programs' own log (aya-log, read by the agent): [`KERNEL_LOG_OFF`] or
    /// [`KERNEL_LOG_DEBUG`] (each decision: redirect, bypass, refusal and why).
    pub const KERNEL_LOG: u32 = 4;
    /// Whether the programs send flow events (`MESH_EVENTS`): only while someone
    /// observes (`meshctl observe`). Each costs the connect() a ring buffer record and,
    /// with the reader idle, a wake-up, which on a virtual machine is an interrupt
    /// round trip through the hypervisor; nobody reads them otherwise.
    pub const FLOW_EVENTS: u32 = 5;
    pub const LEN: u32 = 6;

    pub const KERNEL_LOG_OFF: u32 = 0;
    pub const KERNEL_LOG_DEBUG: u32 = 1;
}

/// Program names in the object file.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// sk_lookup, attached to each enrolled pod's network namespace: one instance per
    /// pod, with the pod's netns cookie in [`SK_LOOKUP_NETNS_GLOBAL`].
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// The global the loader sets for each instance of [`SK_LOOKUP`].
    pub const SK_LOOKUP_NETNS_GLOBAL: &str = "NETNS_COOKIE";
    /// sk_msg, attached to [`super::maps::SOCKETS`].
    pub const SK_MSG: &str = "mesh_sk_msg";
    /// Raw tracepoint on every recvmsg: counts what sockmap receivers read.
    pub const RECV_GUARD: &str = "mesh_recv_guard";
    /// The tracepoint [`RECV_GUARD`] attaches to (kernel 6.4+).
    pub const RECV_GUARD_TARGET: &str = "sock_recv_length";
    /// Raw tracepoint on every sendmsg: corrects what `sk_msg` charged to what the
    /// call really sent (a TCP push can fail part-way; the caller sends it again).
    pub const SEND_GUARD: &str = "mesh_send_guard";
    /// The tracepoint [`SEND_GUARD`] attaches to (kernel 6.4+).
    pub const SEND_GUARD_TARGET: &str = "sock_send_length";
}

/// Bounds of every map. LRU maps hold entries that may be orphaned (a socket that
/// closes before the agent reads its record); the hash maps are owned by the agent.
pub mod limits {
    pub const ENROLLED_NETNS: u32 = 4096;
    pub const SERVICES: u32 = 65536;
    pub const PEER_ORIG_DST: u32 = 65536;
    /// Two plaintext listeners (IPv4, IPv6) per enrolled pod.
    pub const PLAINTEXT_LISTENERS: u32 = 2 * ENROLLED_NETNS;
    /// Bytes of the flow event ring buffer (a power-of-two number of pages): about
    /// 4600 events of 56 bytes (plus an 8-byte header each) before the reader catches up.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Two sockets per accelerated connection.
    pub const SOCKETS: u32 = 65536;
    pub const SOCK_FALLBACK: u32 = 16384;
    pub const SOCK_UNREAD: u32 = 65536;
    pub const SOCK_SENDING: u32 = 65536;
    /// Endpoints of fail-open services, in total.
    pub const BACKENDS: u32 = 16384;
    /// Endpoints of one fail-open service port the kernel picks from (the first ones).
    pub const BACKENDS_PER_SERVICE: u32 = 64;
}

/// Indices into the per-CPU counter array.
pub mod counters {
    /// TCP connect() from an enrolled netns, redirected to the agent (any destination
    /// but loopback and the pod's own addresses).
    pub const REDIRECTED: u32 = 0;
    /// connect() from an enrolled netns by the agent itself (bypass mark and the
    /// agent's thread group): not captured.
    pub const BYPASS_MARK: u32 = 1;
    /// ... of the redirected ones, those whose destination is not a mesh ClusterIP
    /// (a pod IP, or anything outside the mesh): the agent decides what they are.
    pub const NOT_A_SERVICE: u32 = 2;
    /// A record could not be written (map full, or the kernel refused); the connect()
    /// is refused (EPERM) rather than let out uncaptured.
    pub const MAP_UPDATE_FAILED: u32 = 3;
    /// getpeername() answered with the original destination.
    pub const PEERNAME_RESTORED: u32 = 4;
    /// STRICT: a plaintext connection to an enrolled pod was refused.
    pub const INBOUND_STRICT_REFUSED: u32 = 5;
    /// PERMISSIVE: a plaintext connection was handed to the agent's :15006.
    pub const INBOUND_PLAINTEXT_CAPTURED: u32 = 6;
    /// PERMISSIVE, but the agent's listener was missing: refused (fail closed).
    pub const INBOUND_NO_LISTENER: u32 = 7;
    /// A flow event was lost because the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 8;
    /// A pod-agent hop socket was put into the sockmap.
    pub const SOCKMAP_ADDED: u32 = 9;
    /// ... or could not be (map full): that socket stays on the TCP path.
    pub const SOCKMAP_ADD_FAILED: u32 = 10;
    /// Messages handed straight to the other end of a hop by `sk_msg`.
    pub const SOCKMAP_REDIRECTED: u32 = 11;
    /// Bytes in those messages.
    pub const SOCKMAP_REDIRECTED_BYTES: u32 = 12;
    /// A socket sent before its peer was in the sockmap and stays on the TCP path.
    pub const SOCKMAP_FALLBACK: u32 = 13;
    /// A receiver fell behind by more than the unread limit: its sender (an
    /// application's socket) moved to TCP.
    pub const SOCKMAP_BACKPRESSURE: u32 = 14;
    /// ... and came back to the sockmap once the receiver had read everything.
    pub const SOCKMAP_RESUMED: u32 = 15;
    /// Sends of the agent to a receiver more than half the unread limit behind (the
    /// agent waits for it to catch up before it goes past the limit).
    pub const SOCKMAP_PACED: u32 = 16;
    /// connect() from an enrolled netns carrying the bypass mark from a process that
    /// is not the agent: captured anyway.
    pub const BYPASS_MARK_FORGED: u32 = 17;
    /// connect() from an enrolled netns to loopback or the pod's own address: in-pod
    /// traffic, not captured.
    pub const IN_POD: u32 = 18;
    /// No agent served the node (stale heartbeat) and the destination was a
    /// fail-open service: connected straight to one of its endpoints.
    pub const FAIL_OPEN: u32 = 19;
    /// No agent served the node and the connection was not to a fail-open service:
    /// refused (fail closed).
    pub const AGENT_DOWN_REFUSED: u32 = 20;
    pub const LEN: u32 = 21;

    /// Every counter's name, by index, as metrics and `meshctl` show it.
    pub const NAMES: [&str; LEN as usize] = [
        "redirected",
        "bypass_mark",
        "not_a_service",
        "map_update_failed",
        "peername_restored",
        "inbound_strict_refused",
        "inbound_plaintext_captured",
        "inbound_no_listener",
        "events_dropped",
        "sockmap_added",
        "sockmap_add_failed",
        "sockmap_redirected",
        "sockmap_redirected_bytes",
        "sockmap_fallback",
        "sockmap_backpressure",
        "sockmap_resumed",
        "sockmap_paced",
        "bypass_mark_forged",
        "in_pod",
        "fail_open",
        "agent_down_refused",
    ];
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Value of [`maps::ENROLLED_NETNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// How plaintext arriving in this netns is treated: [`MODE_STRICT`] or
    /// [`MODE_PERMISSIVE`]; anything else is treated as STRICT.
    pub mode: u32,
    pub _pad: u32,
    /// The pod's own addresses (16-byte form; all zero when unused). A connect() to
    /// one of them stays inside the pod and is not captured.
    pub own: [[u8; 16]; 2],
    /// The address the node's own processes (the kubelet) reach this pod from: the
    /// source the node's routing picks toward the pod IP. All zero: none.
    pub probe_src: [u8; 16],
    /// The ports the kubelet probes (host byte order; 0 unused): plaintext from
    /// `probe_src` to one of them passes to the application in either mode.
    pub probe_ports: [u16; MAX_PROBE_PORTS],
}

/// Probe ports kept per pod; a pod that probes more ports has the first ones kept.
pub const MAX_PROBE_PORTS: usize = 8;

/// Key of [`maps::PLAINTEXT_LISTENERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// `AF_INET` (2) or `AF_INET6` (10): sk_lookup can only hand a connection to a
    /// listener of its own family.
    pub family: u32,
    pub _pad: u32,
}

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// What `connect4/6` does with a connect() from a socket in an enrolled netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// The agent's own socket (bypass mark, agent's thread group): left alone.
    Agent,
    /// Loopback or one of the pod's own addresses: left alone.
    InPod,
    /// Redirected to the agent. `forged_mark`: the socket carried the bypass mark
    /// but the caller is not the agent.
    Capture { forged_mark: bool },
}

/// The capture decision, kept out of the program so it can be tested on the host.
/// `caller_tgid` is the thread group of the process calling connect(), `agents` the
/// ids in [`settings::AGENT_TGID`] and [`settings::PREVIOUS_AGENT_TGID`] (the agent,
/// and during a handover the one handing over; 0: not written, so not exempt).
pub const fn connect_verdict(
    enrolled: &EnrolledNetns,
    dst: &[u8; 16],
    marked: bool,
    caller_tgid: u32,
    agents: [u32; 2],
) -> ConnectVerdict {
    let agent = caller_tgid != 0 && (caller_tgid == agents[0] || caller_tgid == agents[1]);
    if marked && agent {
        return ConnectVerdict::Agent;
    }
    if is_loopback16(dst) || is_own(enrolled, dst) {
        return ConnectVerdict::InPod;
    }
    ConnectVerdict::Capture {
        forged_mark: marked && !agent,
    }
}

/// Whether `addr` is one of the pod's own addresses.
pub const fn is_own(enrolled: &EnrolledNetns, addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < enrolled.own.len() {
        if !is_zero16(&enrolled.own[i]) && eq16(&enrolled.own[i], addr) {
            return true;
        }
        i += 1;
    }
    false
}

/// The 16 bytes as two words: the BPF target compares words in two instructions
/// where a byte loop unrolls into sixteen branches and spills the stack.
#[inline(always)]
const fn words16(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

#[inline(always)]
const fn is_zero16(a: &[u8; 16]) -> bool {
    let (x, y) = words16(a);
    x == 0 && y == 0
}

/// Equality that the BPF target compiles without a `memcmp` call.
#[inline(always)]
pub const fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a0, a1) = words16(a);
    let (b0, b1) = words16(b);
    a0 == b0 && a1 == b1
}

/// Whether a connection from `remote` to `local_port` is the kubelet's probe: from
/// the node's address toward the pod, to a port the pod's spec probes.
#[inline(always)]
pub const fn is_probe(enrolled: &EnrolledNetns, remote: &[u8; 16], local_port: u16) -> bool {
    if local_port == 0 || is_zero16(&enrolled.probe_src) || !eq16(&enrolled.probe_src, remote) {
        return false;
    }
    let mut i = 0;
    while i < MAX_PROBE_PORTS {
        if enrolled.probe_ports[i] == local_port {
            return true;
        }
        i += 1;
    }
    false
}

/// What `sk_lookup` does with a new inbound TCP connection in an enrolled netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    /// The regular socket lookup goes on: the tunnel port, or traffic from inside the
    /// pod (loopback, or a source that is one of the pod's own addresses).
    Pass,
    /// STRICT: plaintext from outside the pod is refused.
    Refuse,
    /// PERMISSIVE: handed to the agent's plaintext listener, which authorizes it.
    Capture,
}

/// The inbound decision, for every address of the netns: the destination address
/// plays no part, so an address the agent never heard of (IPv6 link-local, one
/// added later) is covered like the pod IP.
pub const fn inbound_verdict(
    enrolled: &EnrolledNetns,
    local: &[u8; 16],
    remote: &[u8; 16],
    local_port: u16,
) -> InboundVerdict {
    if local_port == INBOUND_TUNNEL_PORT {
        return InboundVerdict::Pass;
    }
    if is_loopback16(remote) || eq16(local, remote) || is_own(enrolled, remote) {
        return InboundVerdict::Pass;
    }
    // The kubelet's probes go straight to the application, as they would without the
    // mesh (and as Istio ambient lets them): a STRICT pod must still become ready.
    if is_probe(enrolled, remote, local_port) {
        return InboundVerdict::Pass;
    }
    if enrolled.mode == MODE_PERMISSIVE {
        InboundVerdict::Capture
    } else {
        InboundVerdict::Refuse
    }
}

/// Key of [`maps::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// ClusterIP, 16 bytes, network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    /// IP protocol number ([`PROTO_TCP`], ...).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`maps::SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// [`SERVICE_FAIL_OPEN`] or 0.
    pub flags: u32,
    /// Entries of this service port in [`maps::BACKENDS`] (indices `0..backends`).
    pub backends: u32,
}

/// [`ServiceValue::flags`]: with no agent serving, connect straight to an endpoint.
pub const SERVICE_FAIL_OPEN: u32 = 1;

/// Key of [`maps::BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: ServiceKey,
    pub index: u32,
}

/// Value of [`maps::BACKENDS`]: an endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    /// 16 bytes, network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The agent's heartbeat ([`maps::HEARTBEAT`]) is written every 250 ms; older than
/// this, the agent is taken for down (dead, or hung).
pub const HEARTBEAT_STALE_NS: u64 = 2_000_000_000;

/// What a captured connect() does with no agent serving the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentDown {
    /// The agent serves: capture as always.
    No,
    /// No agent, a fail-open service with endpoints: connect to endpoint `index`.
    Open { index: u32 },
    /// No agent, and not a fail-open service (or none of its endpoints): refuse.
    Closed,
}

/// The decision, kept out of the program so it can be tested on the host.
/// `heartbeat` 0: never written (an agent of an older build), taken for alive.
/// `random` picks the endpoint.
pub const fn agent_down(
    heartbeat: u64,
    now: u64,
    service: Option<&ServiceValue>,
    random: u32,
) -> AgentDown {
    if heartbeat == 0 || now.saturating_sub(heartbeat) <= HEARTBEAT_STALE_NS {
        return AgentDown::No;
    }
    match service {
        Some(s) if s.flags & SERVICE_FAIL_OPEN != 0 && s.backends > 0 => AgentDown::Open {
            index: random % s.backends,
        },
        _ => AgentDown::Closed,
    }
}

/// The destination an application asked for before `connect4/6` rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network namespace cookie of the socket that called connect().
    pub netns_cookie: u64,
    /// Original destination address, 16 bytes, network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Original destination port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of [`maps::PEER_ORIG_DST`]: the client end of a redirected connection as the
/// agent sees it on the socket it accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Network namespace cookie of the pod (the agent knows it from the listener).
    pub netns_cookie: u64,
    /// Client address, 16 bytes, network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Client port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of [`maps::SOCKETS`] and [`maps::SOCK_FALLBACK`]: one end of a TCP connection
/// as that end sees it. The peer of a socket is found by swapping local and remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Loopback addresses repeat in every pod, so the namespace is part of the key.
    pub netns_cookie: u64,
    /// 16 bytes, network byte order, IPv4 mapped.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Value of [`maps::SOCK_UNREAD`], for one receiving socket of a hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFlow {
    /// Bytes the peer sent (by either path) minus bytes this socket read. Updated
    /// atomically: the sender adds, the recvmsg guard subtracts, from different CPUs.
    pub unread: i64,
    /// 1 while the peer sends by TCP because this socket fell behind.
    pub on_tcp: u32,
    pub _pad: u32,
}

/// Value of [`maps::SOCK_SENDING`], for one sending socket of a hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockSending {
    /// Bytes `sk_msg` charged to the receiver during the sendmsg in progress; the
    /// send guard takes them back and charges what the call returned instead.
    pub charged: i64,
    /// The receiving socket charged (its key in [`maps::SOCK_UNREAD`]).
    pub receiver: u64,
    /// 1 when the sender is the agent. The agent holds itself back from a lagging
    /// receiver (see [`counters::SOCKMAP_PACED`]), so its bytes never go by TCP
    /// behind bytes still queued in the sockmap.
    pub paced: u32,
    pub _pad: u32,
}

/// The port in a `remote_port` field of `bpf_sock_ops` or `sk_msg_md`: network byte
/// order, and on little-endian kernels shifted into the upper half of the word.
pub const fn remote_port_from_ctx(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// Whether a 16-byte (IPv4-mapped) address is loopback (127.0.0.0/8 or ::1).
pub const fn is_loopback16(a: &[u8; 16]) -> bool {
    let v4_mapped = a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff;
    if v4_mapped {
        return a[12] == 127;
    }
    let mut i = 0;
    while i < 15 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[15] == 1
}

/// The 16-byte form of an IPv4 address in network byte order, as `::ffff:a.b.c.d`.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// `EnrolledNetns::mode` values.
pub const MODE_STRICT: u32 = 1;
pub const MODE_PERMISSIVE: u32 = 2;

/// `FlowEvent::kind` values.
pub mod events {
    /// connect() to a mesh service was handed to the agent.
    pub const REDIRECTED: u32 = 1;
    /// connect() from an enrolled netns carried the bypass mark (the agent's own dial).
    pub const BYPASSED: u32 = 2;
    /// Plaintext to a STRICT pod was refused.
    pub const REFUSED_STRICT: u32 = 3;
    /// Plaintext to a PERMISSIVE pod was handed to the agent.
    pub const PLAINTEXT_CAPTURED: u32 = 4;
    /// Plaintext to a PERMISSIVE pod was refused: the agent's listener is gone.
    pub const NO_LISTENER: u32 = 5;
    /// No agent served the node: connect() to a fail-open service went straight to an
    /// endpoint.
    pub const FAIL_OPEN: u32 = 6;
    /// No agent served the node: connect() refused (fail closed).
    pub const AGENT_DOWN: u32 = 7;
}

/// One entry of [`maps::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// One of [`events`].
    pub kind: u32,
    pub _pad: u32,
    /// The network namespace the decision was made in (0 when unknown).
    pub netns_cookie: u64,
    /// Source address, 16 bytes, network byte order, IPv4 mapped; zero when unknown
    /// (a connect() has no source yet).
    pub src: [u8; 16],
    /// Destination address, as `src`.
    pub dst: [u8; 16],
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    pub _pad2: u32,
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: every type is #[repr(C)], Copy, made of integers and byte arrays, with all
    // padding spelled out as fields, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockFlow {}
    // SAFETY: as above; explicit padding, no implicit gaps.
    unsafe impl aya::Pod for super::SockSending {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EnrolledNetns>(), 72);
        assert_eq!(size_of::<ListenerKey>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<BackendKey>(), 24);
        assert_eq!(size_of::<BackendValue>(), 24);
        assert_eq!(size_of::<OrigDst>(), 32);
        assert_eq!(size_of::<PeerKey>(), 32);
        assert_eq!(size_of::<FlowEvent>(), 56);
        assert_eq!(size_of::<SockKey>(), 48);
        assert_eq!(size_of::<SockFlow>(), 16);
        assert_eq!(size_of::<SockSending>(), 24);
    }

    #[test]
    fn the_peer_key_swaps_the_ends_and_back() {
        let k = SockKey {
            netns_cookie: 7,
            local_addr: v4_mapped([127, 0, 0, 1]),
            remote_addr: v4_mapped([127, 0, 0, 2]),
            local_port: 40000,
            remote_port: OUTBOUND_PORT,
            _pad: 0,
        };
        let p = k.peer();
        assert_eq!(p.local_port, OUTBOUND_PORT);
        assert_eq!(p.remote_addr, k.local_addr);
        assert_eq!(p.peer(), k);
    }

    #[test]
    fn remote_ports_are_read_shifted_or_not() {
        let be = u32::from(15001u16.to_be());
        assert_eq!(remote_port_from_ctx(be << 16), 15001);
        assert_eq!(remote_port_from_ctx(be), 15001);
    }

    #[test]
    fn loopback_is_127_slash_8_and_colon_colon_1() {
        assert!(is_loopback16(&v4_mapped([127, 0, 0, 1])));
        assert!(is_loopback16(&v4_mapped([127, 9, 9, 9])));
        assert!(!is_loopback16(&v4_mapped([10, 0, 0, 1])));
        assert!(is_loopback16(&core::net::Ipv6Addr::LOCALHOST.octets()));
        assert!(!is_loopback16(&[0; 16]));
    }

    #[test]
    fn v4_mapped_is_the_ipv6_mapped_form() {
        assert_eq!(
            v4_mapped([10, 96, 0, 20]),
            core::net::Ipv4Addr::new(10, 96, 0, 20)
                .to_ipv6_mapped()
                .octets()
        );
    }

    fn pod(mode: u32) -> EnrolledNetns {
        EnrolledNetns {
            mode,
            _pad: 0,
            own: [v4_mapped([10, 244, 1, 5]), [0; 16]],
            probe_src: [0; 16],
            probe_ports: [0; MAX_PROBE_PORTS],
        }
    }

    const AGENT: u32 = 4242;

    #[test]
    fn the_agent_is_exempt_only_with_the_mark_and_its_own_thread_group() {
        let p = pod(MODE_STRICT);
        let dst = v4_mapped([10, 244, 2, 9]);
        assert_eq!(
            connect_verdict(&p, &dst, true, AGENT, [AGENT, 0]),
            ConnectVerdict::Agent
        );
        // A root process in the pod that sets the mark is captured, and counted.
        assert_eq!(
            connect_verdict(&p, &dst, true, 77, [AGENT, 0]),
            ConnectVerdict::Capture { forged_mark: true }
        );
        // Before the agent wrote its id, nothing is exempt.
        assert_eq!(
            connect_verdict(&p, &dst, true, 0, [0, 0]),
            ConnectVerdict::Capture { forged_mark: true }
        );
        assert_eq!(
            connect_verdict(&p, &dst, false, AGENT, [AGENT, 0]),
            ConnectVerdict::Capture { forged_mark: false }
        );
    }

    #[test]
    fn with_the_agent_down_only_fail_open_services_with_endpoints_open() {
        let s = 1_000_000_000u64;
        let open = ServiceValue {
            flags: SERVICE_FAIL_OPEN,
            backends: 3,
        };
        let closed = ServiceValue {
            flags: 0,
            backends: 0,
        };
        let empty = ServiceValue {
            flags: SERVICE_FAIL_OPEN,
            backends: 0,
        };
        // A fresh heartbeat, or none ever written: the agent serves.
        assert_eq!(agent_down(10 * s, 11 * s, Some(&open), 7), AgentDown::No);
        assert_eq!(agent_down(0, 100 * s, Some(&open), 7), AgentDown::No);
        // Stale: open picks among the endpoints, everything else is refused.
        assert_eq!(
            agent_down(10 * s, 13 * s, Some(&open), 7),
            AgentDown::Open { index: 1 }
        );
        assert_eq!(
            agent_down(10 * s, 13 * s, Some(&closed), 7),
            AgentDown::Closed
        );
        assert_eq!(
            agent_down(10 * s, 13 * s, Some(&empty), 7),
            AgentDown::Closed
        );
        assert_eq!(agent_down(10 * s, 13 * s, None, 7), AgentDown::Closed);
    }

    #[test]
    fn during_a_handover_both_agents_are_exempt_and_no_one_else() {
        let p = pod(MODE_STRICT);
        let dst = v4_mapped([10, 244, 2, 9]);
        const OLD: u32 = 4100;
        for caller in [AGENT, OLD] {
            assert_eq!(
                connect_verdict(&p, &dst, true, caller, [AGENT, OLD]),
                ConnectVerdict::Agent
            );
        }
        assert_eq!(
            connect_verdict(&p, &dst, true, 77, [AGENT, OLD]),
            ConnectVerdict::Capture { forged_mark: true }
        );
        // Once the old agent is gone its slot is 0 again, and exempts nothing.
        assert_eq!(
            connect_verdict(&p, &dst, true, OLD, [AGENT, 0]),
            ConnectVerdict::Capture { forged_mark: true }
        );
    }

    #[test]
    fn every_destination_is_captured_but_loopback_and_the_pod_itself() {
        let p = pod(MODE_PERMISSIVE);
        for dst in [
            v4_mapped([10, 96, 0, 10]),
            v4_mapped([10, 244, 2, 9]),
            v4_mapped([192, 0, 2, 1]),
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        ] {
            assert_eq!(
                connect_verdict(&p, &dst, false, 1, [AGENT, 0]),
                ConnectVerdict::Capture { forged_mark: false },
                "{dst:?}"
            );
        }
        for dst in [
            v4_mapped([127, 0, 0, 1]),
            core::net::Ipv6Addr::LOCALHOST.octets(),
            v4_mapped([10, 244, 1, 5]),
        ] {
            assert_eq!(
                connect_verdict(&p, &dst, false, 1, [AGENT, 0]),
                ConnectVerdict::InPod
            );
        }
        // An all-zero slot is no address: 0.0.0.0-mapped is not "own".
        assert!(!is_own(&p, &[0; 16]));
    }

    #[test]
    fn inbound_is_decided_by_the_netns_mode_for_every_address() {
        let outside = v4_mapped([10, 244, 1, 9]);
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let added = v4_mapped([10, 250, 0, 1]);
        let strict = pod(MODE_STRICT);
        let permissive = pod(MODE_PERMISSIVE);
        for local in [v4_mapped([10, 244, 1, 5]), link_local, added] {
            let remote = if local == link_local {
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9]
            } else {
                outside
            };
            assert_eq!(
                inbound_verdict(&strict, &local, &remote, 8080),
                InboundVerdict::Refuse
            );
            assert_eq!(
                inbound_verdict(&permissive, &local, &remote, 8080),
                InboundVerdict::Capture
            );
            assert_eq!(
                inbound_verdict(&strict, &local, &remote, INBOUND_TUNNEL_PORT),
                InboundVerdict::Pass
            );
        }
        // From inside the pod: the agent delivering, the app to itself.
        let me = v4_mapped([10, 244, 1, 5]);
        assert_eq!(
            inbound_verdict(&strict, &me, &me, 8080),
            InboundVerdict::Pass
        );
        assert_eq!(
            inbound_verdict(&strict, &added, &me, 8080),
            InboundVerdict::Pass
        );
        assert_eq!(
            inbound_verdict(&strict, &me, &v4_mapped([127, 0, 0, 1]), 8080),
            InboundVerdict::Pass
        );
        // An unknown mode is STRICT.
        assert_eq!(
            inbound_verdict(&pod(0), &me, &outside, 8080),
            InboundVerdict::Refuse
        );
    }

    #[test]
    fn only_the_nodes_address_to_a_probed_port_passes_as_a_probe() {
        let node = v4_mapped([10, 244, 1, 1]);
        let me = v4_mapped([10, 244, 1, 5]);
        let mut p = pod(MODE_STRICT);
        // No probe source known: nothing is a probe, not even port 0 slots.
        assert_eq!(
            inbound_verdict(&p, &me, &node, 8080),
            InboundVerdict::Refuse
        );
        assert!(!is_probe(&p, &[0; 16], 0));
        p.probe_src = node;
        p.probe_ports[0] = 8080;
        p.probe_ports[MAX_PROBE_PORTS - 1] = 9090;
        for mode in [MODE_STRICT, MODE_PERMISSIVE] {
            p.mode = mode;
            assert_eq!(inbound_verdict(&p, &me, &node, 8080), InboundVerdict::Pass);
            assert_eq!(inbound_verdict(&p, &me, &node, 9090), InboundVerdict::Pass);
            // The same port from anyone else, and another port from the node, are
            // plaintext as usual.
            let refused_or_captured = if mode == MODE_STRICT {
                InboundVerdict::Refuse
            } else {
                InboundVerdict::Capture
            };
            assert_eq!(
                inbound_verdict(&p, &me, &v4_mapped([10, 244, 1, 9]), 8080),
                refused_or_captured
            );
            assert_eq!(inbound_verdict(&p, &me, &node, 8081), refused_or_captured);
            // An unused slot (0) is no port.
            assert_eq!(inbound_verdict(&p, &me, &node, 0), refused_or_captured);
        }
        // The node's address differing in one byte of either word is not the node.
        let mut near = node;
        near[3] = 1;
        assert!(!is_probe(&p, &near, 8080));
        let mut near = node;
        near[15] = 2;
        assert!(!is_probe(&p, &near, 8080));
    }

    #[test]
    fn the_name_tables_cover_every_index() {
        assert_eq!(counters::NAMES.len(), counters::LEN as usize);
        assert_eq!(counters::NAMES[counters::IN_POD as usize], "in_pod");
        assert_eq!(
            counters::NAMES[counters::BYPASS_MARK_FORGED as usize],
            "bypass_mark_forged"
        );
        assert!(maps::ALL.contains(&maps::SETTINGS));
    }
}
