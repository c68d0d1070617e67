use std::net::Ipv4Addr;

/// Kernel errors, classified where the errno is known so that the message tells the
/// operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel has no vxlan support; load the vxlan module on the host (modprobe vxlan)")]
    NoVxlan,
    #[error("the kernel has no macvlan support; load the macvlan module on the host (modprobe macvlan)")]
    NoMacvlan,
    #[error("VNI {vni} is already used by another VXLAN device on UDP port {port}; pick another VNI or remove that device")]
    VniInUse { vni: u32, port: u16 },
    #[error("UDP port {port} is in use by another socket or a VXLAN device with different flags; free the port or set --vxlan-port / VROUTER_VXLAN_PORT")]
    PortInUse { port: u16 },
    #[error("operation not permitted: {op}; the process needs CAP_NET_ADMIN")]
    NotPermitted { op: String },
    #[error("link {0} not found")]
    NoSuchLink(String),
    #[error("{op} failed for {what}: {source}")]
    Netlink {
        op: &'static str,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op} failed: {errno}")]
    Errno { op: String, errno: nix::errno::Errno },
    #[error("address {0} is not on any local link")]
    NoSuchAddress(Ipv4Addr),
}
