//! A host's routes as keys and values, and the difference between what a store holds and
//! what it should hold.
//!
//! ```text
//! /skydns/<domain reversed, one label per segment>/<name>/<host>     {"host":"<ip>","port":<p>,"ttl":<t>}
//! /skydns/<domain reversed>/vm/<id>/<host>                           {"host":"<ip>","ttl":<t>}
//! /hearth/routes/<host>/<id>                                          {"machine_id","name","ip","ports"}
//! ```
//!
//! The SkyDNS keys end with the host, so machines of one name on several hosts sit side
//! by side and each host owns exactly the keys that end with its own name. `port` is the
//! first declared port (CoreDNS answers SRV with it), omitted when there is none.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::machine::spec::ID_LABEL;
use crate::route::Route;

/// Where a host's keys go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The DNS domain (`hearth.internal`).
    pub domain: String,
    /// This host's name in keys (a DNS label).
    pub host: String,
    /// TTL written into SkyDNS values, in seconds.
    pub ttl: u32,
}

#[derive(Serialize)]
struct SkyDns {
    host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    ttl: u32,
}

#[derive(Serialize)]
struct RouteRecord<'a> {
    machine_id: &'a str,
    name: &'a str,
    ip: String,
    ports: &'a [u16],
}

impl Layout {
    /// `/skydns/internal/hearth` for `hearth.internal`.
    pub fn skydns_root(&self) -> String {
        let mut root = String::from("/skydns");
        for label in self.domain.trim_end_matches('.').rsplit('.') {
            root.push('/');
            root.push_str(&label.to_ascii_lowercase());
        }
        root
    }

    /// `/hearth/routes/<host>/`: this host's route records.
    pub fn routes_prefix(&self) -> String {
        format!("/hearth/routes/{}/", self.host)
    }

    /// Every key and value `route` is published as.
    pub fn entries(&self, route: &Route) -> Vec<(String, String)> {
        let root = self.skydns_root();
        let sky = |port: Option<u16>| {
            serde_json::to_string(&SkyDns {
                host: route.ip.to_string(),
                port,
                ttl: self.ttl,
            })
            .unwrap_or_default()
        };
        let record = serde_json::to_string(&RouteRecord {
            machine_id: &route.machine_id,
            name: &route.name,
            ip: route.ip.to_string(),
            ports: &route.ports,
        })
        .unwrap_or_default();
        vec![
            (
                format!("{root}/{}/{}", route.name, self.host),
                sky(route.ports.first().copied()),
            ),
            (
                format!("{root}/{ID_LABEL}/{}/{}", route.machine_id, self.host),
                sky(None),
            ),
            (
                format!("{}{}", self.routes_prefix(), route.machine_id),
                record,
            ),
        ]
    }

    /// True when `key` is one this host owns: a route record under its prefix, or a
    /// SkyDNS key of exactly the shapes it writes (`<root>/<name>/<host>`,
    /// `<root>/vm/<id>/<host>`). Anything else under the domain (an operator's own record,
    /// a sub-zone, another host's keys) is left alone.
    pub fn owns(&self, key: &str) -> bool {
        if let Some(id) = key.strip_prefix(&self.routes_prefix()) {
            return !id.is_empty() && !id.contains('/');
        }
        let Some(rest) = key.strip_prefix(&format!("{}/", self.skydns_root())) else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [name, host] => *host == self.host && !name.is_empty() && *name != ID_LABEL,
            [ID_LABEL, id, host] => *host == self.host && !id.is_empty(),
            _ => false,
        }
    }

    /// What to write and delete so that a store holding `present` (this host's keys, or
    /// more: keys it does not own are left alone) holds exactly `routes`.
    pub fn reconcile(&self, routes: &[Route], present: &BTreeMap<String, String>) -> Plan {
        let wanted: BTreeMap<String, String> = routes
            .iter()
            .flat_map(|route| self.entries(route))
            .collect();
        let put = wanted
            .iter()
            .filter(|(key, value)| present.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let delete = present
            .keys()
            .filter(|key| self.owns(key) && !wanted.contains_key(*key))
            .cloned()
            .collect();
        Plan { put, delete }
    }
}

/// The changes that bring a store in line with the records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to write (missing, or holding another value).
    pub put: Vec<(String, String)>,
    /// Keys to remove (this host's, for no route).
    pub delete: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn layout() -> Layout {
        Layout {
            domain: "hearth.internal".into(),
            host: "worker-1".into(),
            ttl: 10,
        }
    }

    fn route(id: &str, name: &str, last: u8, ports: &[u16]) -> Route {
        Route {
            machine_id: id.into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 213, 0, last),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn a_route_becomes_skydns_and_route_records() {
        let entries = layout().entries(&route("0a1b", "web", 6, &[80, 443]));
        assert_eq!(
            entries,
            vec![
                (
                    "/skydns/internal/hearth/web/worker-1".to_string(),
                    r#"{"host":"10.213.0.6","port":80,"ttl":10}"#.to_string()
                ),
                (
                    "/skydns/internal/hearth/vm/0a1b/worker-1".to_string(),
                    r#"{"host":"10.213.0.6","ttl":10}"#.to_string()
                ),
                (
                    "/hearth/routes/worker-1/0a1b".to_string(),
                    r#"{"machine_id":"0a1b","name":"web","ip":"10.213.0.6","ports":[80,443]}"#
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn reconcile_writes_what_is_missing_and_removes_only_this_hosts_extras() {
        let layout = layout();
        let kept = route("0a1b", "web", 6, &[80]);
        let changed = route("0c2d", "api", 14, &[8080]);
        let missing = route("0e3f", "db", 22, &[]);
        let mut present: BTreeMap<String, String> = layout.entries(&kept).into_iter().collect();
        for (key, _) in layout.entries(&changed) {
            present.insert(key, "stale".into());
        }
        // A machine of this host that is gone, and keys of other hosts and other trees.
        for (key, value) in layout.entries(&route("dead", "old", 30, &[22])) {
            present.insert(key, value);
        }
        let foreign = [
            "/skydns/internal/hearth/web/worker-2",
            "/hearth/routes/worker-2/0a1b",
            "/skydns/com/example/www/worker-1",
            "/other/worker-1",
            // An operator's record for the host itself, and a sub-zone's.
            "/skydns/internal/hearth/worker-1",
            "/skydns/internal/hearth/dc1/web/worker-1",
            "/hearth/routes/worker-1/a/b",
        ];
        for key in foreign {
            present.insert(key.into(), "theirs".into());
        }
        let plan = layout.reconcile(&[kept, changed.clone(), missing.clone()], &present);
        let put: Vec<&str> = plan.put.iter().map(|(k, _)| k.as_str()).collect();
        let mut expected: Vec<String> = layout
            .entries(&changed)
            .into_iter()
            .chain(layout.entries(&missing))
            .map(|(k, _)| k)
            .collect();
        expected.sort();
        assert_eq!(put, expected.iter().map(String::as_str).collect::<Vec<_>>());
        let mut gone: Vec<String> = layout
            .entries(&route("dead", "old", 30, &[22]))
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        gone.sort();
        assert_eq!(plan.delete, gone);
        for key in foreign {
            assert!(!plan.delete.iter().any(|k| k == key), "{key} is not ours");
        }
    }

    #[test]
    fn a_store_in_line_needs_nothing() {
        let layout = layout();
        let routes = vec![route("0a1b", "web", 6, &[80])];
        let present: BTreeMap<String, String> =
            routes.iter().flat_map(|r| layout.entries(r)).collect();
        assert_eq!(layout.reconcile(&routes, &present), Plan::default());
        assert_eq!(layout.skydns_root(), "/skydns/internal/hearth");
    }
}
