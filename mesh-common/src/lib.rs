//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so the byte layout the kernel
//! sees is the one user space writes. Addresses are always stored as 16 bytes: IPv4 as
//! an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one map serves both families.
//! Addresses are in network byte order (as the kernel hands them out), ports in host
//! byte order.
#![no_std]

/// `SO_MARK` set on every socket the agent opens. The `connect4/6` programs never
/// redirect a socket carrying it, so the agent cannot capture its own traffic.
pub const BYPASS_MARK: u32 = 0x0004_d3a1;

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
    /// netns cookie -> [`super::EnrolledNetns`]: network namespaces of enrolled pods.
    pub const ENROLLED_NETNS: &str = "MESH_ENROLLED_NETNS";
    /// [`super::ServiceKey`] -> [`super::ServiceValue`]: mesh services (ClusterIP, port, proto).
    pub const SERVICES: &str = "MESH_SERVICES";
    /// socket cookie -> [`super::OrigDst`]: written by `connect4/6`, read by `getpeername4/6`
    /// and by `sock_ops` to fill [`PEER_ORIG_DST`].
    pub const SOCK_ORIG_DST: &str = "MESH_SOCK_ORIG_DST";
    /// [`super::PeerKey`] -> [`super::OrigDst`]: the same record, keyed by what the agent
    /// sees on the accepted socket (netns of the listener, client address and port).
    pub const PEER_ORIG_DST: &str = "MESH_PEER_ORIG_DST";
    /// Per-CPU counters, indexed by [`super::counters`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// Pod IP -> how its inbound plaintext is treated ([`InboundPolicy`]).
    pub const INBOUND: &str = "MESH_INBOUND";
    /// Pod IP -> the agent's plaintext listener (:15006) in that pod (SOCKHASH).
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
    pub const LEN: u32 = 4;
}

/// Program names in the object file.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// sk_lookup, attached to each enrolled pod's network namespace.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
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
    pub const SOCK_ORIG_DST: u32 = 65536;
    pub const PEER_ORIG_DST: u32 = 65536;
    pub const INBOUND: u32 = 8192;
    /// Bytes of the flow event ring buffer (a power-of-two number of pages): about
    /// 4600 events of 56 bytes (plus an 8-byte header each) before the reader catches up.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Two sockets per accelerated connection.
    pub const SOCKETS: u32 = 65536;
    pub const SOCK_FALLBACK: u32 = 16384;
    pub const SOCK_UNREAD: u32 = 65536;
    pub const SOCK_SENDING: u32 = 65536;
}

/// Indices into the per-CPU counter array.
pub mod counters {
    /// connect() from an enrolled netns to a mesh service, redirected to the agent.
    pub const REDIRECTED: u32 = 0;
    /// connect() from an enrolled netns that carried the bypass mark.
    pub const BYPASS_MARK: u32 = 1;
    /// connect() from an enrolled netns to a destination that is not a mesh service.
    pub const NOT_A_SERVICE: u32 = 2;
    /// A record could not be written (map full, or the kernel refused).
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
    pub const LEN: u32 = 17;
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Value of [`maps::ENROLLED_NETNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved for per-pod flags (inbound mode, ...). Zero today.
    pub flags: u32,
    pub _pad: u32,
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
    /// Reserved for per-service flags. Zero today.
    pub flags: u32,
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

/// `InboundPolicy::mode` values.
pub const MODE_STRICT: u32 = 1;
pub const MODE_PERMISSIVE: u32 = 2;

/// Key of the inbound maps: a pod IP, IPv4 as v4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPolicy {
    pub mode: u32,
    pub _pad: u32,
}

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
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::InboundPolicy {}
    // SAFETY: every type is #[repr(C)], Copy, made of integers and byte arrays, with all
    // padding spelled out as fields, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::EnrolledNetns {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
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
        assert_eq!(size_of::<EnrolledNetns>(), 8);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 4);
        assert_eq!(size_of::<OrigDst>(), 32);
        assert_eq!(size_of::<PeerKey>(), 32);
        assert_eq!(size_of::<InboundKey>(), 16);
        assert_eq!(size_of::<InboundPolicy>(), 8);
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
}
