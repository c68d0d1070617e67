//! Underlay faults for a [`Topology`]: a host's link down, a new underlay address,
//! partitions and random loss.
//!
//! Partitions and loss are nftables rules in a `bridge` table of the underlay namespace
//! (`faults_<prefix>`), on the forward hook of `br0`: every frame between two hosts
//! crosses it, and nothing else in the harness uses that table. [`Topology::heal`] and
//! [`Topology::clear_underlay_loss`] remove the rules; [`Topology::clear_underlay_faults`]
//! deletes the table; deleting the underlay namespace (topology drop) removes it too.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

use crate::cmd::{exec, exec_input, exec_ok};
use crate::topology::{Topology, UNDERLAY_GW};

impl Topology {
    /// Name of the bridge-family table holding the underlay faults.
    pub fn faults_table(&self) -> String {
        format!("faults_{}", self.prefix)
    }

    /// Name of host `i`'s veth end in the underlay namespace (a port of `br0`).
    pub fn underlay_port(&self, host: usize) -> String {
        format!("h{host}")
    }

    /// Cuts (`up = false`) or restores host `host`'s underlay link. The underlay end of
    /// the veth goes down: the host keeps its address and routes (its `eth0` only loses
    /// carrier), exactly as when a cable is pulled, and everything works again once the
    /// link is back.
    pub fn set_underlay_link(&self, host: usize, up: bool) -> Result<()> {
        let port = self.underlay_port(host);
        exec_ok(
            Some(&self.underlay_ns),
            &["ip", "link", "set", &port, if up { "up" } else { "down" }],
        )?;
        Ok(())
    }

    /// Replaces host `host`'s underlay address by `new_ip` (same /24), keeping the
    /// default route through the underlay gateway; announces the new address with a
    /// gratuitous ARP so the other hosts' neighbour caches follow at once.
    pub fn change_underlay_ip(&mut self, host: usize, new_ip: Ipv4Addr) -> Result<()> {
        let o = new_ip.octets();
        if o[0..3] != [198, 18, 0] || o[3] == 0 || o[3] == 255 || new_ip == UNDERLAY_GW {
            bail!("{new_ip} is not a free address of 198.18.0.0/24");
        }
        if self.hosts().iter().any(|h| h.underlay_ip == new_ip) {
            bail!("{new_ip} is already used by a host");
        }
        let ns = self.host(host).ns.clone();
        let old = self.host(host).underlay_ip;
        let n = Some(ns.as_str());
        // Old address first: with promote_secondaries off, deleting a primary address
        // would take the new (secondary) one with it.
        exec_ok(
            n,
            &["ip", "addr", "del", &format!("{old}/24"), "dev", "eth0"],
        )?;
        exec_ok(
            n,
            &["ip", "addr", "add", &format!("{new_ip}/24"), "dev", "eth0"],
        )?;
        exec_ok(
            n,
            &[
                "ip",
                "route",
                "replace",
                "default",
                "via",
                &UNDERLAY_GW.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        // Best effort: arping is not always installed; ARP resolves anyway on demand.
        let _ = exec(
            n,
            &["arping", "-U", "-c", "1", "-I", "eth0", &new_ip.to_string()],
        );
        self.host_mut(host).underlay_ip = new_ip;
        Ok(())
    }

    /// Creates the faults table (idempotent) with its two chains on br0's forward hook.
    fn ensure_faults_table(&self) -> Result<()> {
        let t = self.faults_table();
        let script = format!(
            "add table bridge {t}\n\
             add chain bridge {t} partition {{ type filter hook forward priority -200; policy accept; }}\n\
             add chain bridge {t} loss {{ type filter hook forward priority -190; policy accept; }}\n"
        );
        exec_input(
            Some(&self.underlay_ns),
            &["nft", "-f", "-"],
            script.as_bytes(),
        )
        .context("creating the underlay faults table")?;
        Ok(())
    }

    /// Drops every IPv4 packet between a host of `a` and a host of `b` (both ways), at
    /// their current underlay addresses. Adds to earlier partitions until [`Topology::heal`].
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<()> {
        self.ensure_faults_table()?;
        let t = self.faults_table();
        let mut script = String::new();
        for &x in a {
            for &y in b {
                if x == y {
                    bail!("host {x} is on both sides of the partition");
                }
                let (ix, iy) = (self.host(x).underlay_ip, self.host(y).underlay_ip);
                script.push_str(&format!(
                    "add rule bridge {t} partition ip saddr {ix} ip daddr {iy} drop\n\
                     add rule bridge {t} partition ip saddr {iy} ip daddr {ix} drop\n"
                ));
            }
        }
        exec_input(
            Some(&self.underlay_ns),
            &["nft", "-f", "-"],
            script.as_bytes(),
        )
        .context("adding partition rules")?;
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        self.ensure_faults_table()?;
        exec_ok(
            Some(&self.underlay_ns),
            &[
                "nft",
                "flush",
                "chain",
                "bridge",
                &self.faults_table(),
                "partition",
            ],
        )?;
        Ok(())
    }

    /// Drops `percent` % of the IPv4 packets crossing the underlay (between any two
    /// hosts), at random (`numgen random mod 100 < percent`). Replaces an earlier loss
    /// rule; 0 clears it.
    pub fn underlay_loss(&self, percent: u32) -> Result<()> {
        if percent > 100 {
            bail!("loss {percent}% > 100%");
        }
        self.ensure_faults_table()?;
        let t = self.faults_table();
        let mut script = format!("flush chain bridge {t} loss\n");
        if percent > 0 {
            script.push_str(&format!(
                "add rule bridge {t} loss ether type ip numgen random mod 100 < {percent} drop\n"
            ));
        }
        exec_input(
            Some(&self.underlay_ns),
            &["nft", "-f", "-"],
            script.as_bytes(),
        )
        .context("setting underlay loss")?;
        Ok(())
    }

    /// Removes the loss rule.
    pub fn clear_underlay_loss(&self) -> Result<()> {
        self.underlay_loss(0)
    }

    /// Deletes the faults table (partitions and loss), if present.
    pub fn clear_underlay_faults(&self) {
        let _ = exec(
            Some(&self.underlay_ns),
            &["nft", "delete", "table", "bridge", &self.faults_table()],
        );
    }

    /// The faults table as `nft list` shows it (empty if none), for diagnostics.
    pub fn underlay_faults(&self) -> String {
        exec(
            Some(&self.underlay_ns),
            &["nft", "list", "table", "bridge", &self.faults_table()],
        )
        .map(|o| o.stdout)
        .unwrap_or_default()
    }
}
