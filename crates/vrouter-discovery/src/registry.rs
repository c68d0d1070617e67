//! The routers attached on this host, their connections and acknowledgements, and
//! the grace period that keeps a restarting router's stack in place. Pure, with the
//! clock passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vrouter_state::{StackName, StackSpec, Vni};

pub type ConnId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub spec: StackSpec,
    /// The open attach connection, if any.
    pub conn: Option<ConnId>,
    /// When the connection closed (None while connected).
    pub gone_since: Option<Instant>,
    pub acked: u64,
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
            },
        );
    }

    /// Registers (or re-registers) a router. Refuses a router address already held by
    /// another stack here; a new connection for the same stack replaces the old one
    /// (a restarted router may reconnect before its old connection is noticed closed).
    pub fn register(&mut self, spec: StackSpec, conn: ConnId) -> Result<(), String> {
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
        let acked = self
            .entries
            .get(&spec.name)
            .filter(|e| e.spec == spec)
            .map(|e| e.acked)
            .unwrap_or(0);
        self.entries.insert(
            spec.name.clone(),
            Entry {
                spec,
                conn: Some(conn),
                gone_since: None,
                acked,
            },
        );
        Ok(())
    }

    /// The connection closed: start the grace period. Returns the stack, if any.
    pub fn disconnected(&mut self, conn: ConnId, now: Instant) -> Option<StackName> {
        let e = self.entries.values_mut().find(|e| e.conn == Some(conn))?;
        e.conn = None;
        e.gone_since = Some(now);
        Some(e.spec.name.clone())
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

    #[test]
    fn grace_keeps_a_restarting_router() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        r.register(spec("a", "10.1.0.254"), 1).unwrap();
        assert!(r.ack(1, 5));
        assert_eq!(r.disconnected(1, t0).unwrap().as_str(), "a");
        assert!(r.expire(t0 + Duration::from_secs(1), grace).is_empty());
        assert_eq!(r.next_expiry(grace), Some(t0 + grace));
        r.register(spec("a", "10.1.0.254"), 2).unwrap();
        assert_eq!(r.get(&StackName::new("a").unwrap()).unwrap().acked, 5);
        assert!(r.expire(t0 + Duration::from_secs(10), grace).is_empty());
        assert_eq!(r.next_expiry(grace), None);
    }

    #[test]
    fn grace_expiry_withdraws() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        r.register(spec("a", "10.1.0.254"), 1).unwrap();
        r.disconnected(1, t0);
        let gone = r.expire(t0 + Duration::from_secs(3), Duration::from_secs(3));
        assert_eq!(gone.len(), 1);
        assert_eq!(r.entries().count(), 0);
    }

    #[test]
    fn router_address_clash_refused_and_acks_per_vni() {
        let mut r = Registry::default();
        r.register(spec("a", "10.1.0.254"), 1).unwrap();
        let e = r.register(spec("b", "10.1.0.254"), 2).unwrap_err();
        assert!(e.contains("already used by stack a"), "{e}");
        r.register(spec("c", "10.1.0.253"), 3).unwrap();
        r.ack(3, 9);
        let mut acks = r.acks(Vni::new(1000).unwrap());
        acks.sort();
        assert_eq!(acks, vec![0, 9]);
        assert!(r.acks(Vni::new(2000).unwrap()).is_empty());
        assert!(r.leave(&StackName::new("a").unwrap()).is_some());
        assert_eq!(r.acks(Vni::new(1000).unwrap()), vec![9]);
    }
}
