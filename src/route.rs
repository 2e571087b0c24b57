//! A machine's route: where the rest of the platform (proxy, DNS) reaches a ready guest.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One published machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The machine.
    pub machine_id: String,
    /// Its name (a DNS label).
    pub name: String,
    /// The guest's address.
    pub ip: Ipv4Addr,
    /// TCP ports the workload serves.
    pub ports: Vec<u16>,
}

/// A change the registry publisher delivers to its sinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteChange {
    /// The route is reachable.
    Published(Route),
    /// The route must no longer be used.
    Unpublished(Route),
}

/// The published routes, mirrored in memory for readers that cannot afford a store read
/// per question (the embedded DNS). Only the RegistryPublisher writes it, after each
/// commit and before it answers the step, so a route is in the mirror exactly while the
/// step that published it counts as done, and gone before an unpublish step returns.
#[derive(Clone, Default)]
pub struct RouteTable {
    inner: std::sync::Arc<std::sync::RwLock<Routes>>,
}

/// The mirror's content: by machine id, and each route's name.
#[derive(Default)]
struct Routes {
    by_id: std::collections::BTreeMap<String, Route>,
    by_name: std::collections::HashMap<String, String>,
}

impl RouteTable {
    /// Replaces the whole mirror (at start, or after a failed commit).
    pub fn reset(&self, routes: Vec<Route>) {
        let mut fresh = Routes::default();
        for route in routes {
            fresh
                .by_name
                .insert(route.name.clone(), route.machine_id.clone());
            fresh.by_id.insert(route.machine_id.clone(), route);
        }
        if let Ok(mut held) = self.inner.write() {
            *held = fresh;
        }
    }

    /// Adds or replaces a route.
    pub fn insert(&self, route: Route) {
        if let Ok(mut held) = self.inner.write() {
            if let Some(old) = held.by_id.get(&route.machine_id).map(|r| r.name.clone()) {
                held.by_name.remove(&old);
            }
            held.by_name
                .insert(route.name.clone(), route.machine_id.clone());
            held.by_id.insert(route.machine_id.clone(), route);
        }
    }

    /// Removes machine `id`'s route, if any.
    pub fn remove(&self, id: &str) {
        if let Ok(mut held) = self.inner.write()
            && let Some(route) = held.by_id.remove(id)
        {
            held.by_name.remove(&route.name);
        }
    }

    /// The route of the machine named `name`.
    pub fn by_name(&self, name: &str) -> Option<Route> {
        let held = self.inner.read().ok()?;
        let id = held.by_name.get(name)?;
        held.by_id.get(id).cloned()
    }

    /// The route of machine `id`.
    pub fn by_id(&self, id: &str) -> Option<Route> {
        self.inner.read().ok()?.by_id.get(id).cloned()
    }

    /// Every published route, by machine id.
    pub fn all(&self) -> Vec<Route> {
        self.inner
            .read()
            .map(|held| held.by_id.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many routes are published.
    pub fn len(&self) -> usize {
        self.inner.read().map(|held| held.by_id.len()).unwrap_or(0)
    }

    /// True when no route is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
