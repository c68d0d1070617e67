//! Privileges. The router keeps CAP_NET_ADMIN and nothing else. It cannot shrink its
//! bounding set (that needs CAP_SETPCAP), so it refuses to run when the container
//! grants more, unless told that this is intended (the all-in-one image), and then
//! lowers its effective, permitted, inheritable and ambient sets to NET_ADMIN.
//!
//! Capability sets are per thread: call [`restrict`] before any other thread starts
//! (before the tokio runtime), so that every thread inherits the lowered sets.

use caps::{CapSet, Capability, CapsHashSet};

const KEEP: Capability = Capability::CAP_NET_ADMIN;

/// The bounding set's verdict: `Ok` when it is NET_ADMIN alone, or when extra
/// capabilities are explicitly allowed; otherwise one line naming them and the fix.
pub fn check_bounding(bounding: &CapsHashSet, allow_extra: bool) -> Result<(), String> {
    let mut extra: Vec<String> = bounding
        .iter()
        .filter(|c| **c != KEEP)
        .map(|c| c.to_string())
        .collect();
    if extra.is_empty() || allow_extra {
        return Ok(());
    }
    extra.sort();
    Err(format!(
        "the router's bounding capability set holds {} besides CAP_NET_ADMIN; drop them with cap_drop: [ALL] and cap_add: [NET_ADMIN], or set VROUTER_ALLOW_EXTRA_CAPS=1",
        extra.join(", ")
    ))
}

/// The target of every set: what it holds now, limited to NET_ADMIN (never raised,
/// except effective, which may be raised from permitted).
fn limited(set: &CapsHashSet) -> CapsHashSet {
    set.iter().copied().filter(|c| *c == KEEP).collect()
}

/// Checks the bounding set and lowers the process's other sets to NET_ADMIN.
pub fn restrict(allow_extra: bool) -> anyhow::Result<()> {
    let bounding = caps::read(None, CapSet::Bounding)
        .map_err(|e| anyhow::anyhow!("reading the bounding capability set: {e}"))?;
    check_bounding(&bounding, allow_extra).map_err(anyhow::Error::msg)?;

    // Ambient first: each ambient capability must stay in permitted and inheritable
    // while it is set. Only drops, never raises.
    let ambient = caps::read(None, CapSet::Ambient).unwrap_or_default();
    for cap in ambient.iter().filter(|c| **c != KEEP) {
        caps::drop(None, CapSet::Ambient, *cap)
            .map_err(|e| anyhow::anyhow!("dropping {cap} from the ambient set: {e}"))?;
    }
    let inheritable = caps::read(None, CapSet::Inheritable)
        .map_err(|e| anyhow::anyhow!("reading the inheritable set: {e}"))?;
    caps::set(None, CapSet::Inheritable, &limited(&inheritable))
        .map_err(|e| anyhow::anyhow!("lowering the inheritable set: {e}"))?;
    let permitted = caps::read(None, CapSet::Permitted)
        .map_err(|e| anyhow::anyhow!("reading the permitted set: {e}"))?;
    let keep = limited(&permitted);
    // Effective must stay within permitted, so lower it before permitted.
    caps::set(None, CapSet::Effective, &keep)
        .map_err(|e| anyhow::anyhow!("lowering the effective set: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(|e| anyhow::anyhow!("lowering the permitted set: {e}"))?;

    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| anyhow::anyhow!("reading the effective set: {e}"))?;
    if !effective.contains(&KEEP) {
        anyhow::bail!(
            "the router runs without CAP_NET_ADMIN; add cap_add: [NET_ADMIN] to the router's service (it programs routes and neighbours in its namespace)"
        );
    }
    tracing::debug!("capabilities lowered to CAP_NET_ADMIN");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_admin_alone_passes() {
        let set: CapsHashSet = [KEEP].into_iter().collect();
        assert!(check_bounding(&set, false).is_ok());
        assert!(check_bounding(&CapsHashSet::new(), false).is_ok());
    }

    #[test]
    fn extra_caps_refused_unless_allowed() {
        let set: CapsHashSet = [KEEP, Capability::CAP_SYS_ADMIN, Capability::CAP_CHOWN]
            .into_iter()
            .collect();
        let e = check_bounding(&set, false).unwrap_err();
        assert!(
            e.contains("CAP_SYS_ADMIN")
                && e.contains("CAP_CHOWN")
                && e.contains("cap_drop: [ALL]")
                && e.contains("VROUTER_ALLOW_EXTRA_CAPS=1"),
            "{e}"
        );
        assert!(check_bounding(&set, true).is_ok());
    }

    #[test]
    fn limited_never_raises() {
        let set: CapsHashSet = [Capability::CAP_CHOWN].into_iter().collect();
        assert!(limited(&set).is_empty());
        let set: CapsHashSet = [Capability::CAP_CHOWN, KEEP].into_iter().collect();
        assert_eq!(limited(&set), [KEEP].into_iter().collect());
    }
}
