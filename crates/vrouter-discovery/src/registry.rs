//! The routers attached on this host, their connections and acknowledgements, and
//! the grace period that keeps a restarting router's stack in place. Pure, with the
//! clock passed in.
//!
//! A connection acts for one stack: [`Registry::admit`] refuses a second stack on the
//! same connection, a name held by a router at another address, and more than
//! [`MAX_STACKS_PER_NETNS`] stacks from one namespace. Whether the namespace really
//! holds the router address is the kernel's to say (`holder`), before `register`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vrouter_state::attach::NetnsKey;
use vrouter_state::{StackName, StackSpec, Vni};

pub type ConnId = u64;

/// Stacks registered and connected from one network namespace at a time. A router
/// namespace holds one stack's router; the namespace check already limits a
/// namespace to the router addresses it holds, this bounds it whatever it holds.
pub const MAX_STACKS_PER_NETNS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: StackSpec,
    /// The open attach connection, if any.
    pub conn: Option<ConnId>,
    /// When the connection closed (None while connected).
    pub gone_since: Option<Instant>,
    pub acked: u64,
    /// The namespace the router registered from (None for a stack restored from a
    /// previous run, until its router reconnects).
    pub netns: Option<NetnsKey>,
    /// The router's policy tracks connections (its registration's `conntrack`; true
    /// until a router says otherwise, the choice that is safe for either kind).
    pub conntrack: bool,
}

#[derive(Debug, Default)]
pub struct Registry {
    entries: BTreeMap<StackName, Entry>,
}

impl Registry {
    /// Restores a stack known from a previous run as if its router had just gone: it
    /// stays for one grace period and is kept if the router reconnects.
    pub fn restore(&mut self, spec: StackSpec, acked: u64, now: Instant) {
        self.entries.insert(
            spec.name.clone(),
            Entry {
                spec,
                conn: None,
                gone_since: Some(now),
                acked,
                netns: None,
                conntrack: true,
            },
        );
    }

    /// Whether `conn`, from namespace `netns`, may register `spec`; changes nothing.
    /// Refused: another stack on a connection that already registered one; a router
    /// address held by another stack here; a name held (connected or in its restart
    /// grace) by a router at another address; more than [`MAX_STACKS_PER_NETNS`]
    /// connected stacks from one namespace. A new connection for the same stack and
    /// address may replace the old one (a restarted router may reconnect before its
    /// old connection is noticed closed); the caller has checked that its namespace
    /// holds the address.
    pub fn admit(&self, spec: &StackSpec, conn: ConnId, netns: NetnsKey) -> Result<(), String> {
        if let Some(own) = self.by_conn(conn).filter(|e| e.spec.name != spec.name) {
            return Err(format!(
                "this connection already registered stack {}; a connection acts for one stack only (stack {} needs a connection of its own)",
                own.spec.name, spec.name
            ));
        }
        if let Some(held) = self
            .entries
            .get(&spec.name)
            .filter(|e| e.spec.router_ip != spec.router_ip)
        {
            let state = if held.conn.is_some() {
                "connected"
            } else {
                "in its restart grace period"
            };
            return Err(format!(
                "stack {} is registered by its router at {} ({state}); a router at {} cannot take the name over. Stop the other router, or wait for its grace period to end if the stack's router address changed",
                spec.name, held.spec.router_ip, spec.router_ip
            ));
        }
        let from_netns = self
            .entries
            .values()
            .filter(|e| e.conn.is_some() && e.netns == Some(netns) && e.spec.name != spec.name)
            .count();
        if from_netns >= MAX_STACKS_PER_NETNS {
            return Err(format!(
                "{from_netns} stacks are already registered from this router's network namespace ({netns}); at most {MAX_STACKS_PER_NETNS} are accepted from one namespace"
            ));
        }
        if let Some(other) = self
            .entries
            .values()
            .find(|e| e.spec.name != spec.name && e.spec.router_ip == spec.router_ip)
        {
            return Err(format!(
                "router address {} of stack {} is already used by stack {} on this host; give each router its own address",
                spec.router_ip, spec.name, other.spec.name
            ));
        }
        Ok(())
    }

    /// Registers (or re-registers) a router after [`Registry::admit`]'s checks.
    pub fn register(
        &mut self,
        spec: StackSpec,
        conn: ConnId,
        netns: NetnsKey,
    ) -> Result<(), String> {
        self.admit(&spec, conn, netns)?;
        let acked = self
            .entries
            .get(&spec.name)
            .filter(|e| e.spec == spec)
            .map(|e| e.acked)
            .unwrap_or(0);
        let conntrack = self.entries.get(&spec.name).is_none_or(|e| e.conntrack);
        self.entries.insert(
            spec.name.clone(),
            Entry {
                spec,
                conn: Some(conn),
                gone_since: None,
                acked,
                netns: Some(netns),
                conntrack,
            },
        );
        Ok(())
    }

    /// Records whether `stack`'s router tracks connections (each registration says
    /// it; a router whose policy changed registers again on its connection).
    pub fn set_conntrack(&mut self, stack: &StackName, conntrack: bool) {
        if let Some(e) = self.entries.get_mut(stack) {
            e.conntrack = conntrack;
        }
    }

    /// The connection closed: every stack it held starts its grace period. Returns
    /// those stacks.
    pub fn disconnected(&mut self, conn: ConnId, now: Instant) -> Vec<StackName> {
        let mut gone = Vec::new();
        for e in self.entries.values_mut().filter(|e| e.conn == Some(conn)) {
            e.conn = None;
            e.gone_since = Some(now);
            gone.push(e.spec.name.clone());
        }
        gone
    }

    pub fn ack(&mut self, conn: ConnId, generation: u64) -> bool {
        match self.entries.values_mut().find(|e| e.conn == Some(conn)) {
            Some(e) if generation > e.acked => {
                e.acked = generation;
                true
            }
            _ => false,
        }
    }

    /// Withdraws a stack at once (explicit leave).
    pub fn leave(&mut self, name: &StackName) -> Option<Entry> {
        self.entries.remove(name)
    }

    /// Withdraws the stacks whose grace period ran out.
    pub fn expire(&mut self, now: Instant, grace: Duration) -> Vec<StackName> {
        let gone: Vec<StackName> = self
            .entries
            .values()
            .filter(|e| e.gone_since.is_some_and(|t| now.duration_since(t) >= grace))
            .map(|e| e.spec.name.clone())
            .collect();
        for n in &gone {
            self.entries.remove(n);
        }
        gone
    }

    /// When the next grace period ends, if any is running.
    pub fn next_expiry(&self, grace: Duration) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| e.gone_since)
            .min()
            .map(|t| t + grace)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, name: &StackName) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn by_conn(&self, conn: ConnId) -> Option<&Entry> {
        self.entries.values().find(|e| e.conn == Some(conn))
    }

    /// Acknowledged generations of the connected routers on a VNI.
    pub fn acks(&self, vni: Vni) -> Vec<u64> {
        self.entries
            .values()
            .filter(|e| e.conn.is_some() && e.spec.vni == vni)
            .map(|e| e.acked)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, ip: &str) -> StackSpec {
        StackSpec {
            name: StackName::new(name).unwrap(),
            vni: Vni::new(1000).unwrap(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            router_ip: ip.parse().unwrap(),
        }
    }

    const NS: NetnsKey = NetnsKey { dev: 4, ino: 100 };

    fn ns(ino: u64) -> NetnsKey {
        NetnsKey { dev: 4, ino }
    }

    #[test]
    fn conntrack_flag_defaults_to_true_and_follows_registrations() {
        let mut r = Registry::default();
        let a = StackName::new("a").unwrap();
        r.restore(spec("a", "10.1.0.254"), 0, Instant::now());
        assert!(r.get(&a).unwrap().conntrack, "unknown: the safe choice");
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        r.set_conntrack(&a, false);
        assert!(!r.get(&a).unwrap().conntrack);
        // A second registration on the connection keeps it until the caller sets it.
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        assert!(!r.get(&a).unwrap().conntrack);
        r.set_conntrack(&a, true);
        assert!(r.get(&a).unwrap().conntrack);
        r.set_conntrack(&StackName::new("nobody").unwrap(), false);
    }

    #[test]
    fn grace_keeps_a_restarting_router() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        assert!(r.ack(1, 5));
        assert_eq!(r.disconnected(1, t0), vec![StackName::new("a").unwrap()]);
        assert!(r.expire(t0 + Duration::from_secs(1), grace).is_empty());
        assert_eq!(r.next_expiry(grace), Some(t0 + grace));
        r.register(spec("a", "10.1.0.254"), 2, ns(2)).unwrap();
        assert_eq!(r.get(&StackName::new("a").unwrap()).unwrap().acked, 5);
        assert!(r.expire(t0 + Duration::from_secs(10), grace).is_empty());
        assert_eq!(r.next_expiry(grace), None);
    }

    #[test]
    fn grace_expiry_withdraws() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        r.disconnected(1, t0);
        let gone = r.expire(t0 + Duration::from_secs(3), Duration::from_secs(3));
        assert_eq!(gone.len(), 1);
        assert_eq!(r.entries().count(), 0);
    }

    #[test]
    fn router_address_clash_refused_and_acks_per_vni() {
        let mut r = Registry::default();
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        let e = r.register(spec("b", "10.1.0.254"), 2, ns(2)).unwrap_err();
        assert!(e.contains("already used by stack a"), "{e}");
        r.register(spec("c", "10.1.0.253"), 3, ns(3)).unwrap();
        r.ack(3, 9);
        let mut acks = r.acks(Vni::new(1000).unwrap());
        acks.sort();
        assert_eq!(acks, vec![0, 9]);
        assert!(r.acks(Vni::new(2000).unwrap()).is_empty());
        assert!(r.leave(&StackName::new("a").unwrap()).is_some());
        assert_eq!(r.acks(Vni::new(1000).unwrap()), vec![9]);
    }

    #[test]
    fn a_connection_acts_for_one_stack() {
        let mut r = Registry::default();
        r.register(spec("a", "10.1.0.254"), 1, NS).unwrap();
        // The same stack again on the same connection is a re-registration.
        r.register(spec("a", "10.1.0.254"), 1, NS).unwrap();
        let e = r.register(spec("b", "10.2.0.254"), 1, NS).unwrap_err();
        assert!(e.contains("already registered stack a"), "{e}");
        assert!(
            r.get(&StackName::new("b").unwrap()).is_none(),
            "nothing left"
        );
        // Acks on the connection apply to its own stack only.
        assert!(r.ack(1, 3));
        assert!(!r.ack(2, 9));
        assert_eq!(r.get(&StackName::new("a").unwrap()).unwrap().acked, 3);
    }

    #[test]
    fn a_name_is_not_taken_over_by_another_router_address() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.register(spec("a", "10.1.0.254"), 1, ns(1)).unwrap();
        let e = r.register(spec("a", "10.9.0.254"), 2, ns(2)).unwrap_err();
        assert!(
            e.contains("registered by its router at 10.1.0.254 (connected)"),
            "{e}"
        );
        // Nor during its restart grace.
        r.disconnected(1, t0);
        let e = r.register(spec("a", "10.9.0.254"), 2, ns(2)).unwrap_err();
        assert!(e.contains("in its restart grace period"), "{e}");
        let a = r.get(&StackName::new("a").unwrap()).unwrap();
        assert_eq!(
            (a.spec.router_ip.to_string(), a.conn),
            ("10.1.0.254".into(), None)
        );
        // The restarted router (same address, new namespace) takes it back.
        r.register(spec("a", "10.1.0.254"), 3, ns(3)).unwrap();
        // After the grace ends, the name is free.
        r.disconnected(3, t0);
        r.expire(t0 + Duration::from_secs(5), Duration::from_secs(3));
        r.register(spec("a", "10.9.0.254"), 2, ns(2)).unwrap();
    }

    #[test]
    fn every_stack_of_a_closed_connection_takes_the_grace_path() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        // Restored stacks adopted by one connection (as an older discovery allowed).
        for (name, ip) in [("a", "10.1.0.254"), ("b", "10.2.0.254")] {
            r.restore(spec(name, ip), 0, t0);
            let e = r.entries.get_mut(&StackName::new(name).unwrap()).unwrap();
            e.conn = Some(7);
            e.gone_since = None;
        }
        let mut gone = r.disconnected(7, t0);
        gone.sort();
        assert_eq!(gone.len(), 2);
        assert!(r
            .entries()
            .all(|e| e.conn.is_none() && e.gone_since == Some(t0)));
        assert_eq!(
            r.expire(t0 + Duration::from_secs(3), Duration::from_secs(3))
                .len(),
            2
        );
    }

    #[test]
    fn stacks_per_namespace_are_capped() {
        let mut r = Registry::default();
        for i in 0..MAX_STACKS_PER_NETNS {
            let name = format!("s{i}");
            let ip = format!("10.{i}.0.254");
            r.register(spec(&name, &ip), i as u64, NS).unwrap();
        }
        let e = r.register(spec("x", "10.99.0.254"), 99, NS).unwrap_err();
        assert!(e.contains("at most 4"), "{e}");
        r.register(spec("x", "10.99.0.254"), 99, ns(2)).unwrap();
        // A stack that went away no longer counts.
        r.disconnected(0, Instant::now());
        r.register(spec("y", "10.98.0.254"), 98, NS).unwrap();
    }
}
