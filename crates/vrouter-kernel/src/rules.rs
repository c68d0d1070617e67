//! IPv4 policy-routing rules.

use crate::error::{classify, errno_of, is_gone, Context};
use crate::{Kernel, Result, Rule};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

impl Kernel {
    /// Every IPv4 rule, the kernel's defaults (priorities 0, 32766, 32767) included.
    pub async fn rules(&self) -> Result<Vec<Rule>> {
        let mut message = RuleMessage::default();
        message.header.family = AddressFamily::Inet;
        let answers = self
            .get(RouteNetlinkMessage::GetRule(message), true)
            .await
            .map_err(|e| classify("dump rules", "IPv4".into(), Context::Plain, e))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRule(m) => rule_of(m),
                _ => None,
            })
            .collect())
    }

    /// `ip rule add pref P [iif I] [fwmark M] lookup T proto N`. Adding a rule that
    /// already exists is not an error (NLM_F_EXCL, then EEXIST => Ok), so it is
    /// idempotent. The kernel's duplicate check ignores the protocol.
    pub async fn add_rule(&self, rule: &Rule) -> Result<()> {
        let message = rule_message(rule);
        match self
            .ack(
                RouteNetlinkMessage::NewRule(message),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(classify("add rule", describe(rule), Context::Plain, e)),
        }
    }

    /// Deletes exactly this rule (priority, iif, fwmark, table and protocol). A rule
    /// that is already gone is not an error (ENOENT => Ok).
    pub async fn delete_rule(&self, rule: &Rule) -> Result<()> {
        let message = rule_message(rule);
        match self.ack(RouteNetlinkMessage::DelRule(message), 0).await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(classify("delete rule", describe(rule), Context::Plain, e)),
        }
    }
}

/// "pref 1000 iif brA lookup 101 proto 118", as `ip rule` says it.
fn describe(rule: &Rule) -> String {
    let mut s = format!("pref {}", rule.priority);
    if let Some(iif) = &rule.iif {
        s += &format!(" iif {iif}");
    }
    if let Some(mark) = rule.fwmark {
        s += &format!(" fwmark {mark:#x}");
    }
    s + &format!(" lookup {} proto {}", rule.table, rule.protocol)
}

fn rule_message(rule: &Rule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = AddressFamily::Inet;
    // An explicit action: FR_ACT_UNSPEC would be stored and then fail every lookup.
    message.header.action = RuleAction::ToTable;
    // FRA_TABLE always: it is the only way to name tables above 255.
    message.header.table = u8::try_from(rule.table).unwrap_or(0);
    message.attributes.push(RuleAttribute::Table(rule.table));
    message
        .attributes
        .push(RuleAttribute::Priority(rule.priority));
    if let Some(iif) = &rule.iif {
        message.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some(mark) = rule.fwmark {
        message.attributes.push(RuleAttribute::FwMark(mark));
    }
    message
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(rule.protocol)));
    message
}

fn rule_of(message: RuleMessage) -> Option<Rule> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    let mut rule = Rule {
        priority: 0,
        iif: None,
        fwmark: None,
        table: u32::from(message.header.table),
        protocol: 0,
    };
    for attribute in message.attributes {
        match attribute {
            RuleAttribute::Priority(p) => rule.priority = p,
            RuleAttribute::Iifname(name) => rule.iif = Some(name),
            RuleAttribute::FwMark(mark) => rule.fwmark = Some(mark),
            RuleAttribute::Table(t) => rule.table = t,
            RuleAttribute::Protocol(p) => rule.protocol = p.into(),
            _ => {}
        }
    }
    Some(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips() {
        for table in [101, 1000] {
            let rule = Rule {
                priority: 1000,
                iif: Some("brA".into()),
                fwmark: Some(0x76),
                table,
                protocol: vrouter_state::RTPROT_VROUTER,
            };
            let m = rule_message(&rule);
            assert_eq!(m.header.action, RuleAction::ToTable);
            assert_eq!(rule_of(m), Some(rule));
        }
    }

    #[test]
    fn description_names_the_rule() {
        let rule = Rule {
            priority: 1000,
            iif: Some("brA".into()),
            fwmark: None,
            table: 101,
            protocol: 118,
        };
        assert_eq!(describe(&rule), "pref 1000 iif brA lookup 101 proto 118");
    }
}
