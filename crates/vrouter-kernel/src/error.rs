use std::net::Ipv4Addr;

/// Kernel errors, classified where the errno is known so that the message tells the
/// operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel has no vxlan support; load the vxlan module on the host (modprobe vxlan)")]
    NoVxlan,
    #[error(
        "the kernel has no macvlan support; load the macvlan module on the host (modprobe macvlan)"
    )]
    NoMacvlan,
    #[error("VNI {vni} is already used by another VXLAN device on UDP port {port}; pick another VNI or remove that device")]
    VniInUse { vni: u32, port: u16 },
    #[error("UDP port {port} is in use by another socket or a VXLAN device with different flags; free the port or set --vxlan-port / VROUTER_VXLAN_PORT")]
    PortInUse { port: u16 },
    #[error("the kernel has no nf_tables support, so traffic is not counted; load it on the host (modprobe nf_tables)")]
    NoNfTables,
    #[error("the kernel has no WireGuard support (no wireguard module)")]
    NoWireGuard,
    #[error("operation not permitted: {op}; the process needs CAP_NET_ADMIN")]
    NotPermitted { op: String },
    #[error("link {0} not found")]
    NoSuchLink(String),
    #[error("cannot create {what}: a link of that name already exists ({names}); delete the leftover (ip link del NAME) or pick another name")]
    LinkExists { what: String, names: String },
    #[error("cannot make link {link} a port of {master}: {master} is not a bridge; pass the bridge's index")]
    NotABridge { link: String, master: String },
    #[error("{op} failed for {what}: {source}")]
    Netlink {
        op: &'static str,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op} failed: {errno}")]
    Errno {
        op: String,
        errno: nix::errno::Errno,
    },
    #[error("the kernel has no nexthop objects (Linux 5.3 or later has them): {op} was refused; routes go with a plain gateway instead")]
    NoNexthops { op: String },
    #[error("address {0} is not on any local link")]
    NoSuchAddress(Ipv4Addr),
}

/// The kernel's internal "not supported" errno (include/linux/errno.h), which leaks to
/// user space from some drivers; libc has no name for it.
pub(crate) const ENOTSUPP: i32 = 524;

/// The positive errno behind a netlink failure, if the kernel sent one. Netlink carries
/// it negated (`-EEXIST`), so it is negated back here, once, for every caller.
pub(crate) fn errno_of(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|code| -code.get()),
        _ => None,
    }
}

/// Whether a failed delete means the object is already gone: ENOENT (neighbours,
/// rules, FDB rows), ESRCH (routes) or ENODEV (the link itself, or the link the object
/// hung on).
pub(crate) fn is_gone(err: &rtnetlink::Error) -> bool {
    matches!(
        errno_of(err),
        Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV)
    )
}

/// What the failed request was, so that an errno can be turned into the error that
/// tells the operator what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Context {
    /// Nothing beyond EPERM is classified.
    Plain,
    /// The request names a link that may be missing (ENODEV).
    Link(String),
    /// RTM_NEWLINK of a VXLAN device. `vni_taken` says whether another device already
    /// holds the VNI on that port (the caller looks after an EEXIST).
    CreateVxlan {
        vni: u32,
        port: u16,
        underlay: String,
        vni_taken: bool,
    },
    /// RTM_NEWLINK of a macvlan on `parent`.
    CreateMacvlan { parent: String },
    /// RTM_NEWLINK with NLM_F_EXCL; `names` says which names may be taken where.
    Create { names: String },
    /// RTM_NEWLINK of kind wireguard (EOPNOTSUPP: no module).
    CreateWireguard { names: String },
    /// Making `link` a port of `master`; `master_exists` says whether a dump still
    /// finds the master (the kernel answers EINVAL for a missing one).
    SetMaster {
        link: String,
        master: String,
        master_exists: bool,
    },
    /// A nexthop request (`dump` for RTM_GETNEXTHOP): a kernel without nexthop
    /// objects answers EOPNOTSUPP (EINVAL to a dump on some versions).
    Nexthop { dump: bool },
    /// Bringing a link up; `vxlan_port` is set when it is a VXLAN device.
    LinkUp {
        link: String,
        vxlan_port: Option<u16>,
    },
}

/// Turns a netlink failure into a `KernelError`. `op` says what failed ("create vxlan
/// device"), `what` on what ("vxlan1000 (index 5)").
pub(crate) fn classify(
    op: &'static str,
    what: String,
    context: Context,
    source: rtnetlink::Error,
) -> KernelError {
    let errno = errno_of(&source);
    match (errno, context) {
        (Some(libc::EPERM), _) | (Some(libc::EACCES), _) => KernelError::NotPermitted {
            op: format!("{op} {what}"),
        },
        (
            Some(libc::EEXIST),
            Context::CreateVxlan {
                vni,
                port,
                vni_taken: true,
                ..
            },
        ) => KernelError::VniInUse { vni, port },
        (Some(libc::EOPNOTSUPP) | Some(ENOTSUPP), Context::CreateVxlan { .. }) => {
            KernelError::NoVxlan
        }
        (Some(libc::EOPNOTSUPP) | Some(ENOTSUPP), Context::CreateMacvlan { .. }) => {
            KernelError::NoMacvlan
        }
        (
            Some(libc::EADDRINUSE),
            Context::LinkUp {
                vxlan_port: Some(port),
                ..
            },
        ) => KernelError::PortInUse { port },
        (Some(libc::EEXIST), Context::Create { names })
        | (Some(libc::EEXIST), Context::CreateWireguard { names }) => {
            KernelError::LinkExists { what, names }
        }
        (Some(libc::EOPNOTSUPP) | Some(ENOTSUPP), Context::CreateWireguard { .. }) => {
            KernelError::NoWireGuard
        }
        (Some(libc::EOPNOTSUPP) | Some(ENOTSUPP), Context::Nexthop { .. })
        | (Some(libc::EINVAL), Context::Nexthop { dump: true }) => KernelError::NoNexthops {
            op: format!("{op} {what}"),
        },
        (Some(libc::EOPNOTSUPP), Context::SetMaster { link, master, .. }) => {
            KernelError::NotABridge { link, master }
        }
        (
            Some(libc::EINVAL),
            Context::SetMaster {
                master,
                master_exists: false,
                ..
            },
        ) => KernelError::NoSuchLink(master),
        (Some(libc::ENODEV), Context::Link(link))
        | (Some(libc::ENODEV), Context::SetMaster { link, .. })
        | (Some(libc::ENODEV), Context::LinkUp { link, .. })
        | (Some(libc::ENODEV), Context::CreateMacvlan { parent: link })
        | (Some(libc::ENODEV), Context::CreateVxlan { underlay: link, .. }) => {
            KernelError::NoSuchLink(link)
        }
        _ => KernelError::Netlink { op, what, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    /// A kernel NACK as rtnetlink hands it over: the errno negated.
    fn nack(errno: i32) -> rtnetlink::Error {
        let mut msg = ErrorMessage::default();
        msg.code = NonZeroI32::new(-errno);
        rtnetlink::Error::NetlinkError(msg)
    }

    fn vxlan(vni_taken: bool) -> Context {
        Context::CreateVxlan {
            vni: 1000,
            port: 4789,
            underlay: "index 2".into(),
            vni_taken,
        }
    }

    #[test]
    fn errno_is_positive() {
        assert_eq!(errno_of(&nack(libc::EEXIST)), Some(libc::EEXIST));
        assert_eq!(errno_of(&rtnetlink::Error::RequestFailed), None);
    }

    #[test]
    fn wireguard_link_without_module() {
        let ctx = || Context::CreateWireguard {
            names: "wg0 in this namespace".into(),
        };
        for errno in [libc::EOPNOTSUPP, ENOTSUPP] {
            let e = classify("create wireguard device", "wg0".into(), ctx(), nack(errno));
            assert!(matches!(e, KernelError::NoWireGuard), "{errno}: {e:?}");
        }
        let e = classify(
            "create wireguard device",
            "wg0".into(),
            ctx(),
            nack(libc::EEXIST),
        );
        assert!(matches!(e, KernelError::LinkExists { .. }), "{e:?}");
        let e = classify(
            "create wireguard device",
            "wg0".into(),
            ctx(),
            nack(libc::EPERM),
        );
        assert!(matches!(e, KernelError::NotPermitted { .. }), "{e:?}");
    }

    #[test]
    fn gone_on_delete() {
        assert!(is_gone(&nack(libc::ENOENT)));
        assert!(is_gone(&nack(libc::ESRCH)));
        assert!(is_gone(&nack(libc::ENODEV)));
        assert!(!is_gone(&nack(libc::EPERM)));
        assert!(!is_gone(&nack(libc::EEXIST)));
        assert!(!is_gone(&rtnetlink::Error::RequestFailed));
    }

    #[test]
    fn vni_in_use_only_when_another_device_holds_it() {
        let e = classify(
            "create vxlan device",
            "vxlan1000".into(),
            vxlan(true),
            nack(libc::EEXIST),
        );
        assert!(
            matches!(
                e,
                KernelError::VniInUse {
                    vni: 1000,
                    port: 4789
                }
            ),
            "{e}"
        );
        // EEXIST for the device's own name is a name clash, not a VNI clash.
        let e = classify(
            "create vxlan device",
            "vxlan1000".into(),
            vxlan(false),
            nack(libc::EEXIST),
        );
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
        assert!(e.to_string().contains("vxlan1000"), "{e}");
        // A positive code must not be mistaken for the errno (the sign slip).
        let mut wrong_sign = ErrorMessage::default();
        wrong_sign.code = NonZeroI32::new(libc::EEXIST);
        let e = classify(
            "create vxlan device",
            "vxlan1000".into(),
            vxlan(true),
            rtnetlink::Error::NetlinkError(wrong_sign),
        );
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
    }

    #[test]
    fn missing_module() {
        for errno in [libc::EOPNOTSUPP, ENOTSUPP] {
            let e = classify(
                "create vxlan device",
                "vxlan1000".into(),
                vxlan(false),
                nack(errno),
            );
            assert!(matches!(e, KernelError::NoVxlan), "{e}");
            let ctx = Context::CreateMacvlan {
                parent: "vxlan1000".into(),
            };
            let e = classify("create macvlan", "mv0".into(), ctx, nack(errno));
            assert!(matches!(e, KernelError::NoMacvlan), "{e}");
        }
        // Not supported elsewhere is not a missing module.
        let e = classify(
            "set link up",
            "eth0".into(),
            Context::Link("eth0".into()),
            nack(libc::EOPNOTSUPP),
        );
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
    }

    #[test]
    fn port_in_use_only_for_vxlan() {
        let ctx = Context::LinkUp {
            link: "vxlan1000".into(),
            vxlan_port: Some(4789),
        };
        let e = classify(
            "set link up",
            "vxlan1000".into(),
            ctx,
            nack(libc::EADDRINUSE),
        );
        assert!(matches!(e, KernelError::PortInUse { port: 4789 }), "{e}");
        let ctx = Context::LinkUp {
            link: "eth0".into(),
            vxlan_port: None,
        };
        let e = classify("set link up", "eth0".into(), ctx, nack(libc::EADDRINUSE));
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
    }

    #[test]
    fn not_permitted_names_the_operation() {
        let e = classify(
            "set link up",
            "vxlan1000 (index 5)".into(),
            Context::Plain,
            nack(libc::EPERM),
        );
        let KernelError::NotPermitted { op } = &e else {
            panic!("{e}")
        };
        assert_eq!(op, "set link up vxlan1000 (index 5)");
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn name_taken_at_creation() {
        let ctx = Context::Create {
            names: "vra1 here or eth0 in the peer's namespace".into(),
        };
        let e = classify(
            "create veth pair",
            "vra1 (peer eth0 in another namespace)".into(),
            ctx.clone(),
            nack(libc::EEXIST),
        );
        assert!(matches!(e, KernelError::LinkExists { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("vra1") && text.contains("eth0"), "{e}");
        assert!(text.contains("delete the leftover"), "{e}");
        let e = classify("create veth pair", "vra1".into(), ctx, nack(libc::EINVAL));
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
    }

    #[test]
    fn master_must_be_a_bridge() {
        let ctx = |master_exists| Context::SetMaster {
            link: "vra1 (index 7)".into(),
            master: if master_exists {
                "eth0 (index 2)".into()
            } else {
                "index 99".into()
            },
            master_exists,
        };
        let e = classify(
            "set link master",
            "link vra1 (index 7)".into(),
            ctx(true),
            nack(libc::EOPNOTSUPP),
        );
        let KernelError::NotABridge { link, master } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (link.as_str(), master.as_str()),
            ("vra1 (index 7)", "eth0 (index 2)")
        );
        assert!(e.to_string().contains("not a bridge"), "{e}");
        let e = classify(
            "set link master",
            "x".into(),
            ctx(false),
            nack(libc::EINVAL),
        );
        assert_eq!(e.to_string(), "link index 99 not found");
        // EINVAL with the master present is the bridge refusing this port.
        let e = classify("set link master", "x".into(), ctx(true), nack(libc::EINVAL));
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
        let e = classify("set link master", "x".into(), ctx(true), nack(libc::ENODEV));
        assert_eq!(e.to_string(), "link vra1 (index 7) not found");
    }

    #[test]
    fn nexthops_unsupported() {
        let ctx = |dump| Context::Nexthop { dump };
        for errno in [libc::EOPNOTSUPP, ENOTSUPP] {
            let e = classify("replace nexthop", "id 7".into(), ctx(false), nack(errno));
            assert!(matches!(e, KernelError::NoNexthops { .. }), "{e}");
            assert!(e.to_string().contains("replace nexthop id 7"), "{e}");
        }
        let e = classify(
            "dump nexthops",
            String::new(),
            ctx(true),
            nack(libc::EINVAL),
        );
        assert!(matches!(e, KernelError::NoNexthops { .. }), "{e}");
        // EINVAL to a replace is a bad nexthop (a multicast gateway, say), not an old
        // kernel.
        let e = classify(
            "replace nexthop",
            "id 7".into(),
            ctx(false),
            nack(libc::EINVAL),
        );
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
        // Elsewhere EOPNOTSUPP says nothing about nexthops.
        let e = classify(
            "replace route",
            "x".into(),
            Context::Plain,
            nack(libc::EOPNOTSUPP),
        );
        assert!(matches!(e, KernelError::Netlink { .. }), "{e}");
    }

    #[test]
    fn missing_link() {
        let e = classify(
            "set link mtu",
            "index 9".into(),
            Context::Link("index 9".into()),
            nack(libc::ENODEV),
        );
        assert_eq!(e.to_string(), "link index 9 not found");
        let e = classify(
            "replace route",
            "10.2.0.0/24".into(),
            Context::Plain,
            nack(libc::ENODEV),
        );
        assert!(
            e.to_string()
                .starts_with("replace route failed for 10.2.0.0/24"),
            "{e}"
        );
    }
}
