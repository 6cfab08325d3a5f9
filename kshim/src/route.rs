//! LNet routes: which gateway NID carries traffic for a remote network.
//!
//! A destination on one of the local networks is its own next hop. A destination on
//! a remote network goes to a gateway (an LNet router) on a local network, chosen as
//! LNet does: among the routes to that network whose gateway is up, the best
//! priority wins (lower number is preferred), then the fewest hops; equal routes are
//! used in turn (round robin). A gateway reported down by the engine is skipped until
//! it is reported up again.

use std::collections::HashMap;

use crate::nid::{Net, Nid};

/// One route: to reach `net`, send to `gateway`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The remote network.
    pub net: Net,
    /// The router's NID; it must be on a local network.
    pub gateway: Nid,
    /// Hop count to `net` through `gateway` (1 = the router is on `net`).
    pub hops: u32,
    /// Priority; lower is preferred (LNet's default is 0).
    pub priority: u32,
}

/// Why a route was refused or no next hop exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A route's gateway must be reachable directly.
    #[error("gateway {gateway} is not on a local network; a gateway must be directly reachable")]
    GatewayNotLocal {
        /// The gateway.
        gateway: Nid,
    },
    /// A route to a local network makes no sense.
    #[error("network {0} is local; routes are only for remote networks")]
    NetIsLocal(Net),
    /// Hop count must be at least 1.
    #[error("hop count must be 1 or more")]
    BadHops,
    /// No route to the destination's network.
    #[error("no route to {0}: its network is not local and no route names it")]
    NoRoute(Nid),
    /// Every gateway for the destination's network is down.
    #[error("all gateways to {0} are down")]
    AllGatewaysDown(Nid),
}

#[derive(Debug, Clone)]
struct Entry {
    route: Route,
    up: bool,
}

/// The routing table of one kshim instance.
#[derive(Debug, Clone)]
pub struct Table {
    local_nets: Vec<Net>,
    routes: HashMap<Net, Vec<Entry>>,
    rr: HashMap<Net, usize>,
}

impl Table {
    /// A table for a node whose NIDs are on `local_nets`.
    pub fn new(local_nets: impl IntoIterator<Item = Net>) -> Table {
        let mut local_nets: Vec<Net> = local_nets.into_iter().collect();
        local_nets.sort();
        local_nets.dedup();
        Table {
            local_nets,
            routes: HashMap::new(),
            rr: HashMap::new(),
        }
    }

    /// Whether `net` is one of the local networks.
    pub fn is_local(&self, net: Net) -> bool {
        self.local_nets.binary_search(&net).is_ok()
    }

    /// Adds (or replaces, for the same net and gateway) a route.
    pub fn add(&mut self, route: Route) -> Result<(), Error> {
        if self.is_local(route.net) {
            return Err(Error::NetIsLocal(route.net));
        }
        if !self.is_local(route.gateway.net()) {
            return Err(Error::GatewayNotLocal {
                gateway: route.gateway,
            });
        }
        if route.hops == 0 {
            return Err(Error::BadHops);
        }
        let list = self.routes.entry(route.net).or_default();
        if let Some(e) = list.iter_mut().find(|e| e.route.gateway == route.gateway) {
            e.route = route;
        } else {
            list.push(Entry { route, up: true });
        }
        Ok(())
    }

    /// Removes the route to `net` via `gateway`; true if it existed.
    pub fn remove(&mut self, net: Net, gateway: Nid) -> bool {
        let Some(list) = self.routes.get_mut(&net) else {
            return false;
        };
        let before = list.len();
        list.retain(|e| e.route.gateway != gateway);
        before != list.len()
    }

    /// Marks every route through `gateway` up or down.
    pub fn set_gateway_up(&mut self, gateway: Nid, up: bool) {
        for e in self.routes.values_mut().flat_map(|l| l.iter_mut()) {
            if e.route.gateway == gateway {
                e.up = up;
            }
        }
    }

    /// All routes, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes
            .values()
            .flat_map(|l| l.iter().map(|e| &e.route))
    }

    /// The NID the message to `dest` must be handed to: `dest` itself when its network
    /// is local, else a gateway chosen as the module doc says.
    pub fn next_hop(&mut self, dest: Nid) -> Result<Nid, Error> {
        if self.is_local(dest.net()) {
            return Ok(dest);
        }
        let list = self.routes.get(&dest.net()).ok_or(Error::NoRoute(dest))?;
        let best = list
            .iter()
            .filter(|e| e.up)
            .map(|e| (e.route.priority, e.route.hops))
            .min()
            .ok_or(Error::AllGatewaysDown(dest))?;
        let n_best = list
            .iter()
            .filter(|e| e.up && (e.route.priority, e.route.hops) == best)
            .count();
        let turn = self.rr.entry(dest.net()).or_insert(0);
        let pick = *turn % n_best;
        *turn = turn.wrapping_add(1);
        let gw = list
            .iter()
            .filter(|e| e.up && (e.route.priority, e.route.hops) == best)
            .nth(pick)
            .map(|e| e.route.gateway)
            .ok_or(Error::AllGatewaysDown(dest))?;
        Ok(gw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nid(s: &str) -> Nid {
        s.parse().unwrap()
    }
    fn net(s: &str) -> Net {
        s.parse().unwrap()
    }

    fn table() -> Table {
        Table::new([net("lu2k"), net("tcp")])
    }

    #[test]
    fn local_is_direct() {
        let mut t = table();
        assert_eq!(t.next_hop(nid("10.0.0.7@lu2k")), Ok(nid("10.0.0.7@lu2k")));
        assert_eq!(
            t.next_hop(nid("10.9.0.7@lu2k2")),
            Err(Error::NoRoute(nid("10.9.0.7@lu2k2")))
        );
    }

    #[test]
    fn refuses_bad_routes() {
        let mut t = table();
        let r = Route {
            net: net("tcp"),
            gateway: nid("1.1.1.1@lu2k"),
            hops: 1,
            priority: 0,
        };
        assert_eq!(t.add(r), Err(Error::NetIsLocal(net("tcp"))));
        let r = Route {
            net: net("o2ib"),
            gateway: nid("1.1.1.1@tcp5"),
            hops: 1,
            priority: 0,
        };
        assert!(matches!(t.add(r), Err(Error::GatewayNotLocal { .. })));
        let r = Route {
            net: net("o2ib"),
            gateway: nid("1.1.1.1@tcp"),
            hops: 0,
            priority: 0,
        };
        assert_eq!(t.add(r), Err(Error::BadHops));
    }

    #[test]
    fn priority_then_hops_then_round_robin() {
        let mut t = table();
        let far = net("o2ib3");
        let dest = nid("172.16.1.1@o2ib3");
        let g = |s| nid(s);
        t.add(Route {
            net: far,
            gateway: g("10.0.0.1@lu2k"),
            hops: 3,
            priority: 0,
        })
        .unwrap();
        t.add(Route {
            net: far,
            gateway: g("10.0.0.2@lu2k"),
            hops: 1,
            priority: 1,
        })
        .unwrap();
        t.add(Route {
            net: far,
            gateway: g("10.0.0.3@tcp"),
            hops: 1,
            priority: 0,
        })
        .unwrap();
        t.add(Route {
            net: far,
            gateway: g("10.0.0.4@tcp"),
            hops: 1,
            priority: 0,
        })
        .unwrap();
        // .3 and .4 tie on (priority 0, hops 1): used in turn.
        let picks: Vec<Nid> = (0..4).map(|_| t.next_hop(dest).unwrap()).collect();
        assert_eq!(
            picks,
            [
                g("10.0.0.3@tcp"),
                g("10.0.0.4@tcp"),
                g("10.0.0.3@tcp"),
                g("10.0.0.4@tcp")
            ]
        );
        // Down gateways are skipped; then the next-best (priority 0, 3 hops).
        t.set_gateway_up(g("10.0.0.3@tcp"), false);
        assert_eq!(t.next_hop(dest), Ok(g("10.0.0.4@tcp")));
        assert_eq!(t.next_hop(dest), Ok(g("10.0.0.4@tcp")));
        t.set_gateway_up(g("10.0.0.4@tcp"), false);
        assert_eq!(t.next_hop(dest), Ok(g("10.0.0.1@lu2k")));
        t.set_gateway_up(g("10.0.0.1@lu2k"), false);
        assert_eq!(t.next_hop(dest), Ok(g("10.0.0.2@lu2k")));
        t.set_gateway_up(g("10.0.0.2@lu2k"), false);
        assert_eq!(t.next_hop(dest), Err(Error::AllGatewaysDown(dest)));
        t.set_gateway_up(g("10.0.0.1@lu2k"), true);
        assert_eq!(t.next_hop(dest), Ok(g("10.0.0.1@lu2k")));
        assert!(t.remove(far, g("10.0.0.1@lu2k")));
        assert!(!t.remove(far, g("10.0.0.1@lu2k")));
        assert_eq!(t.next_hop(dest), Err(Error::AllGatewaysDown(dest)));
        assert_eq!(t.routes().count(), 3);
    }
}
