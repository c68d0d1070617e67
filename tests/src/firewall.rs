//! A Docker-28.2-like firewall for a simulated host, as nftables tables of its own that
//! mirror the layout iptables-nft gives Docker's rules (`ip filter`, `ip nat`, `ip raw`).
//!
//! Mirrors moby 28.2's iptables rules for user-defined bridge networks:
//! - filter FORWARD policy DROP -> DOCKER-USER (RETURN) -> DOCKER-FORWARD:
//!   established/related to any Docker bridge accepted, DOCKER-ISOLATION-STAGE-1/2
//!   (drop bridge -> other bridge, kept for nat-unprotected), DOCKER chain per bridge
//!   (`! -i br -o br DROP` for protected/"nat" mode, `ACCEPT` for nat-unprotected),
//!   then `-i br ACCEPT` (ICC and outbound);
//! - nat POSTROUTING `-s subnet ! -o br MASQUERADE`, the DOCKER chain hooks;
//! - raw PREROUTING, protected networks only, per container `-d ip ! -i br DROP` (with a
//!   counter here, so tests can prove that nothing hit it).
//!
//! Optionally ([`FwOptions::ct_invalid_drop`]) firewalld's forward chain beside it, as
//! firewalld installs it in its own table: established and related accepted, then
//! `ct state invalid drop` (counted). A host that sees only one direction of a TCP
//! connection drops the other one there.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::topology::Protection;

/// Table names (family `ip`).
pub const FILTER_TABLE: &str = "vrt_filter";
pub const NAT_TABLE: &str = "vrt_nat";
pub const RAW_TABLE: &str = "vrt_raw";
/// Family `inet`: firewalld's table, present only with [`FwOptions::ct_invalid_drop`].
pub const FIREWALLD_TABLE: &str = "vrt_firewalld";

/// What a host's firewall carries beyond Docker's rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FwOptions {
    /// firewalld's `filter_FORWARD` chain with `ct state invalid drop`.
    pub ct_invalid_drop: bool,
}

/// What the firewall needs to know about one Docker network.
#[derive(Debug, Clone)]
pub struct FwNetwork {
    pub bridge: String,
    /// CIDR, e.g. `10.1.0.0/24`.
    pub subnet: String,
    pub protection: Protection,
    /// Container addresses on this network (not the gateway).
    pub containers: Vec<Ipv4Addr>,
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

/// Render the complete ruleset as an `nft -f` script that atomically replaces the three
/// tables (add + delete + define in one transaction).
pub fn render_ruleset(nets: &[FwNetwork]) -> String {
    render_ruleset_with(nets, FwOptions::default())
}

/// [`render_ruleset`] with options; firewalld's table is removed when not wanted.
pub fn render_ruleset_with(nets: &[FwNetwork], opts: FwOptions) -> String {
    let mut s = String::new();
    for t in [RAW_TABLE, FILTER_TABLE, NAT_TABLE] {
        let _ = writeln!(s, "add table ip {t}\ndelete table ip {t}");
    }
    let _ = writeln!(
        s,
        "add table inet {FIREWALLD_TABLE}\ndelete table inet {FIREWALLD_TABLE}"
    );
    if opts.ct_invalid_drop {
        // firewalld 1.x (nftables backend), its forward chain up to the invalid drop;
        // the zone dispatch after it accepts what reaches it in this model.
        let _ = writeln!(
            s,
            "table inet {FIREWALLD_TABLE} {{\n  chain filter_FORWARD {{\n    type filter hook forward priority filter + 10; policy accept;\n    ct state established,related accept\n    ct status dnat accept\n    iifname \"lo\" accept\n    ct state invalid counter drop\n  }}\n}}"
        );
    }
    let bridges: Vec<String> = nets.iter().map(|n| q(&n.bridge)).collect();
    let bridge_set = format!("{{ {} }}", bridges.join(", "));

    // raw
    let _ = writeln!(s, "table ip {RAW_TABLE} {{");
    let _ = writeln!(
        s,
        "  chain PREROUTING {{\n    type filter hook prerouting priority raw; policy accept;"
    );
    for n in nets {
        if n.protection == Protection::Protected {
            for c in &n.containers {
                let _ = writeln!(
                    s,
                    "    iifname != {} ip daddr {c} counter drop",
                    q(&n.bridge)
                );
            }
        }
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(
        s,
        "  chain OUTPUT {{\n    type filter hook output priority raw; policy accept;\n  }}"
    );
    let _ = writeln!(s, "}}");

    // filter
    let _ = writeln!(s, "table ip {FILTER_TABLE} {{");
    let _ = writeln!(
        s,
        "  chain INPUT {{\n    type filter hook input priority filter; policy accept;\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain FORWARD {{\n    type filter hook forward priority filter; policy drop;\n    jump DOCKER-USER\n    jump DOCKER-FORWARD\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain OUTPUT {{\n    type filter hook output priority filter; policy accept;\n  }}"
    );
    let _ = writeln!(s, "  chain DOCKER-USER {{\n    return\n  }}");
    let _ = writeln!(s, "  chain DOCKER-FORWARD {{");
    if !nets.is_empty() {
        let _ = writeln!(
            s,
            "    oifname {bridge_set} ct state established,related accept"
        );
    }
    let _ = writeln!(s, "    jump DOCKER-ISOLATION-STAGE-1");
    if !nets.is_empty() {
        let _ = writeln!(s, "    oifname {bridge_set} jump DOCKER");
    }
    for n in nets {
        let _ = writeln!(s, "    iifname {} accept", q(&n.bridge));
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain DOCKER {{");
    for n in nets {
        let verdict = match n.protection {
            Protection::Protected => "drop",
            Protection::NatUnprotected => "accept",
        };
        let _ = writeln!(
            s,
            "    iifname != {b} oifname {b} {verdict}",
            b = q(&n.bridge)
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain DOCKER-ISOLATION-STAGE-1 {{");
    for n in nets {
        let _ = writeln!(
            s,
            "    iifname {b} oifname != {b} jump DOCKER-ISOLATION-STAGE-2",
            b = q(&n.bridge)
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain DOCKER-ISOLATION-STAGE-2 {{");
    for n in nets {
        let _ = writeln!(s, "    oifname {} drop", q(&n.bridge));
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");

    // nat
    let _ = writeln!(s, "table ip {NAT_TABLE} {{");
    let _ = writeln!(
        s,
        "  chain PREROUTING {{\n    type nat hook prerouting priority dstnat; policy accept;\n    fib daddr type local jump DOCKER\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain OUTPUT {{\n    type nat hook output priority -100; policy accept;\n    ip daddr != 127.0.0.0/8 fib daddr type local jump DOCKER\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain POSTROUTING {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    for n in nets {
        let _ = writeln!(
            s,
            "    oifname != {} ip saddr {} masquerade",
            q(&n.bridge),
            n.subnet
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain DOCKER {{");
    for n in nets {
        let _ = writeln!(s, "    iifname {} return", q(&n.bridge));
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}
