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
//! - raw PREROUTING, protected networks only, per container `-d ip ! -i br DROP`.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::topology::Protection;

/// Table names (family `ip`).
pub const FILTER_TABLE: &str = "vrt_filter";
pub const NAT_TABLE: &str = "vrt_nat";
pub const RAW_TABLE: &str = "vrt_raw";

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
    let mut s = String::new();
    for t in [RAW_TABLE, FILTER_TABLE, NAT_TABLE] {
        let _ = writeln!(s, "add table ip {t}\ndelete table ip {t}");
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
                let _ = writeln!(s, "    iifname != {} ip daddr {c} drop", q(&n.bridge));
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
