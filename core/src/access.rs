//! Who may do what: roles, user and group names, and computer-group membership.
//!
//! The one place where an endpoint's group membership is decided ([`GroupRules::matches`]), from
//! its current facts (hostname, addresses, agent-reported labels). The server's scoping check, the
//! listings it filters and (later) fleet captures of a group all ask here, so a rule means the
//! same everywhere. Nothing here touches a database: the catalog stores rules, this evaluates them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A user's role. Ordered: every role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(utoipa::ToSchema)]
pub enum Role {
    /// Finds endpoints; lists, shows and queries snapshots; views evidence; queue status.
    Viewer,
    /// And: captures, uploads, deletes snapshots, retries and cancels jobs, exports, connections.
    Operator,
    /// And: users, tokens of others, computer groups, enrollment, the audit log; sees every endpoint.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                AccessError(format!(
                    "unknown role {:?}; use admin, operator or viewer",
                    truncated(s)
                ))
            })
    }
}

/// A rule or name that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AccessError(pub String);

/// Longest user or group name.
pub const MAX_NAME_LEN: usize = 64;

/// Shows at most the start of a hostile string in an error message.
fn truncated(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Checks a user or group name (`what` says which): 1 to 64 characters of letters, digits and
/// `-_.@`, starting with a letter or digit. No control characters, spaces or slashes, so a name is
/// safe in a URL path, a terminal and a log line.
pub fn validate_name(what: &str, name: &str) -> Result<(), AccessError> {
    let bad = |why: &str| {
        Err(AccessError(format!(
            "{what} name {:?} {why}",
            truncated(name)
        )))
    };
    if name.is_empty() {
        return Err(AccessError(format!("{what} name is empty")));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return bad(&format!(
            "is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.chars().count()
        ));
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return bad("must start with a letter or digit");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        return bad(&format!(
            "contains {c:?}; use letters, digits and - _ . @ only"
        ));
    }
    Ok(())
}

/// What a group can be matched against: an endpoint's current facts. An endpoint known only
/// from uploaded or dropped snapshots has a hostname and nothing else.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub hostname: &'a str,
    pub ips: &'a [String],
    pub labels: &'a [String],
}

impl<'a> Facts<'a> {
    pub fn hostname_only(hostname: &'a str) -> Facts<'a> {
        Facts {
            hostname,
            ips: &[],
            labels: &[],
        }
    }
}

/// A computer group's rules as stored: an endpoint is a member when any one matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupRules {
    /// Hostname globs (`*`, `?`), case-insensitive.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Networks (`10.1.0.0/16`, `fd00::/8`, or one address) any of the endpoint's addresses is in.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Labels the endpoint's agent reports (exact).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Hostnames that are members whatever their facts (case-insensitive).
    #[serde(default)]
    pub members: Vec<String>,
}

impl GroupRules {
    /// Refuses rules that could never be evaluated as meant: a CIDR that does not parse, an empty
    /// or hostile glob, label or member.
    pub fn validate(&self) -> Result<(), AccessError> {
        for cidr in &self.cidrs {
            Cidr::parse(cidr)?;
        }
        for (what, list) in [
            ("hostname glob", &self.hostnames),
            ("label", &self.labels),
            ("member", &self.members),
        ] {
            for item in list {
                if item.is_empty() || item.len() > 253 || item.chars().any(char::is_control) {
                    return Err(AccessError(format!(
                        "{what} {:?} must be 1 to 253 characters without control characters",
                        truncated(item)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Parses the CIDRs once, for evaluating against many endpoints.
    pub fn compile(&self) -> CompiledGroup {
        CompiledGroup {
            hostnames: self.hostnames.clone(),
            cidrs: self
                .cidrs
                .iter()
                .filter_map(|c| Cidr::parse(c).ok())
                .collect(),
            labels: self.labels.clone(),
            members: self.members.clone(),
        }
    }

    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        self.compile().matches(facts)
    }
}

/// [`GroupRules`] ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledGroup {
    hostnames: Vec<String>,
    cidrs: Vec<Cidr>,
    labels: Vec<String>,
    members: Vec<String>,
}

impl CompiledGroup {
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        let host = facts.hostname;
        self.members.iter().any(|m| m.eq_ignore_ascii_case(host))
            || self
                .hostnames
                .iter()
                .any(|g| glob_matches(g.as_bytes(), host.as_bytes()))
            || self.labels.iter().any(|l| facts.labels.contains(l))
            || (!self.cidrs.is_empty()
                && facts
                    .ips
                    .iter()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                    .any(|ip| self.cidrs.iter().any(|c| c.contains(ip))))
    }
}

/// What a caller may see: every endpoint, or the members of the groups granted to them.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Groups(Vec<CompiledGroup>),
}

impl Scope {
    pub fn groups(rules: &[GroupRules]) -> Scope {
        Scope::Groups(rules.iter().map(GroupRules::compile).collect())
    }

    pub fn allows(&self, facts: &Facts<'_>) -> bool {
        match self {
            Scope::All => true,
            Scope::Groups(groups) => groups.iter().any(|g| g.matches(facts)),
        }
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, AccessError> {
        let bad = |why: &str| {
            Err(AccessError(format!(
                "CIDR {:?} {why}; write it like 10.1.0.0/16 or fd00::/8",
                truncated(text)
            )))
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return bad("does not start with an IP address");
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return bad(&format!("has a prefix length that is not 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V4(net), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|ip| prefix_eq(&net.octets(), &ip.octets(), self.prefix)),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = bits as usize;
    let (whole, rest) = (bits / 8, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[whole] & mask == b[whole] & mask
}

/// `*` matches any run of bytes, `?` one; everything else itself, ASCII case-insensitively.
/// Iterative and allocation-free, so a hostile pattern costs at most len(pattern) × len(text).
fn glob_matches(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(host: &'a str, ips: &'a [String], labels: &'a [String]) -> Facts<'a> {
        Facts {
            hostname: host,
            ips,
            labels,
        }
    }

    #[test]
    fn globs_match_whole_hostnames_case_insensitively() {
        let rules = GroupRules {
            hostnames: vec!["web-*".into(), "db-0?".into()],
            ..Default::default()
        };
        assert!(rules.matches(&Facts::hostname_only("WEB-01")));
        assert!(rules.matches(&Facts::hostname_only("db-07")));
        assert!(!rules.matches(&Facts::hostname_only("db-107")));
        assert!(!rules.matches(&Facts::hostname_only("myweb-01")));
        assert!(glob_matches(b"*a*b*", b"xxaxxbxx"));
        assert!(!glob_matches(b"*a*b", b"xxaxxbxx"));
        assert!(glob_matches(b"WEB-*", b"web-01"));
    }

    #[test]
    fn cidrs_match_any_address_of_the_endpoint() {
        let rules = GroupRules {
            cidrs: vec![
                "10.1.0.0/16".into(),
                "fd00::/8".into(),
                "192.168.5.7".into(),
            ],
            ..Default::default()
        };
        let ips = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(rules.matches(&facts("a", &ips(&["127.0.0.1", "10.1.200.3"]), &[])));
        assert!(!rules.matches(&facts("a", &ips(&["10.2.0.1"]), &[])));
        assert!(rules.matches(&facts("a", &ips(&["fd12::1"]), &[])));
        assert!(rules.matches(&facts("a", &ips(&["192.168.5.7"]), &[])));
        assert!(!rules.matches(&facts("a", &ips(&["192.168.5.8", "garbage"]), &[])));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("10.0.0.0/8")
                .unwrap()
                .contains("::ffff:10.9.9.9".parse().unwrap())
        );
    }

    #[test]
    fn cidrs_that_do_not_parse_are_refused_with_the_reason() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "banana",
            "",
            "fd00::/129",
            "10.0.0.0/x",
        ] {
            let rules = GroupRules {
                cidrs: vec![bad.into()],
                ..Default::default()
            };
            let err = rules.validate().unwrap_err().to_string();
            assert!(err.contains("CIDR"), "{bad}: {err}");
        }
    }

    #[test]
    fn labels_and_members_make_members_and_no_rule_makes_none() {
        let rules = GroupRules {
            labels: vec!["pci".into()],
            members: vec!["Laptop-7".into()],
            ..Default::default()
        };
        let labels = vec!["pci".to_string()];
        assert!(rules.matches(&facts("x", &[], &labels)));
        assert!(rules.matches(&Facts::hostname_only("laptop-7")));
        assert!(!rules.matches(&Facts::hostname_only("laptop-8")));
        assert!(!GroupRules::default().matches(&Facts::hostname_only("anything")));
        assert!(!Scope::groups(&[]).allows(&Facts::hostname_only("anything")));
        assert!(Scope::All.allows(&Facts::hostname_only("anything")));
    }

    #[test]
    fn hostile_names_are_refused_with_a_reason() {
        let long = "a".repeat(10_000);
        for (name, why) in [
            ("", "empty"),
            ("bob\u{7}", "control"),
            ("bob\nadmin", "control"),
            (long.as_str(), "at most 64"),
            ("-bob", "start"),
            ("bob/../x", "'/'"),
            ("bob smith", "' '"),
        ] {
            let err = validate_name("user", name).unwrap_err().to_string();
            assert!(err.contains(why), "{name:?}: {err}");
            assert!(err.len() < 200, "the error repeats the whole name: {err}");
        }
        validate_name("user", "alice.smith@corp").unwrap();
        validate_name("group", "pci-zone_1").unwrap();
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!("operator".parse::<Role>().unwrap(), Role::Operator);
        assert!("root".parse::<Role>().is_err());
    }
}
