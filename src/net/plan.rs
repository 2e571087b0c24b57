//! The names and addresses of one machine's network, derived from its id and its block.
//! Pure: the same inputs always give the same plan, which is what lets every network
//! step and its undo find their objects again after a crash, with nothing stored but the
//! slot.

use std::net::Ipv4Addr;

use super::pool::PoolCidr;

/// Longest name prefix. With a 10-character id the host veth name `<prefix><id>` is then
/// at most 15 bytes, the kernel's limit for interface names.
const MAX_PREFIX_LEN: usize = 5;

/// Prefix length of both link networks in a block (two /30s in a /29).
const LINK_PREFIX_LEN: u8 = 30;

/// Why a plan cannot be derived. Every message quotes the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The name prefix would make bad or too long interface names.
    #[error("network name prefix {0:?} must be 1-5 characters of [a-z0-9] starting with a letter")]
    Prefix(String),
    /// The machine id is not hearth's id shape.
    #[error("machine id {0:?} must be exactly 10 lowercase hex characters")]
    MachineId(String),
    /// The pool has no such block.
    #[error("slot {slot} is outside the address pool {pool}, which has {count} slots")]
    SlotOutsidePool {
        /// The slot asked for.
        slot: u32,
        /// The pool.
        pool: PoolCidr,
        /// How many slots it has.
        count: u32,
    },
}

/// One machine's network: every name and address the host side needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetPlan {
    /// Network namespace name, mounted at [`super::netns_path`]: `<prefix>-<machine id>`.
    pub netns: String,
    /// The veth end in the root namespace: `<prefix><machine id>`.
    pub host_veth: String,
    /// The veth end inside the namespace (`eth0`).
    pub ns_veth: String,
    /// The tap device inside the namespace (`tap0`), handed to the VMM.
    pub tap: String,
    /// Address of `host_veth`: block + 1.
    pub host_addr: Ipv4Addr,
    /// Address of `ns_veth`: block + 2.
    pub ns_addr: Ipv4Addr,
    /// Address of the tap, the guest's gateway: block + 5.
    pub gateway: Ipv4Addr,
    /// The guest's address: block + 6.
    pub guest_addr: Ipv4Addr,
    /// Prefix length of both link networks (30).
    pub prefix_len: u8,
    /// The guest's MAC: `02` (locally administered, unicast) then the id's five bytes, so
    /// it is stable across restarts and unique per machine on the host.
    pub guest_mac: [u8; 6],
}

impl NetPlan {
    /// The plan of machine `machine_id` holding block `slot` of `pool`, with host object
    /// names starting with `prefix`.
    pub fn derive(
        prefix: &str,
        machine_id: &str,
        pool: PoolCidr,
        slot: u32,
    ) -> Result<NetPlan, PlanError> {
        let prefix_ok = (1..=MAX_PREFIX_LEN).contains(&prefix.len())
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !prefix_ok {
            return Err(PlanError::Prefix(prefix.to_string()));
        }
        let id = parse_machine_id(machine_id)
            .ok_or_else(|| PlanError::MachineId(machine_id.to_string()))?;
        let base = pool
            .block(slot)
            .map(u32::from)
            .ok_or(PlanError::SlotOutsidePool {
                slot,
                pool,
                count: pool.slot_count(),
            })?;
        let at = |offset: u32| Ipv4Addr::from(base + offset);
        Ok(NetPlan {
            netns: format!("{prefix}-{machine_id}"),
            host_veth: format!("{prefix}{machine_id}"),
            ns_veth: "eth0".to_string(),
            tap: "tap0".to_string(),
            host_addr: at(1),
            ns_addr: at(2),
            gateway: at(5),
            guest_addr: at(6),
            prefix_len: LINK_PREFIX_LEN,
            guest_mac: [0x02, id[0], id[1], id[2], id[3], id[4]],
        })
    }

    /// The guest's link network (block + 4), routed from the root namespace to the
    /// namespace.
    pub fn guest_network(&self) -> Ipv4Addr {
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        Ipv4Addr::from(u32::from(self.guest_addr) & mask)
    }

    /// The guest MAC in the usual `02:0a:...` notation (what a VMM command line wants).
    pub fn guest_mac_string(&self) -> String {
        let m = self.guest_mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The id's five bytes, when it has hearth's shape (see `machine_id`).
pub(crate) fn parse_machine_id(id: &str) -> Option<[u8; 5]> {
    crate::machine_id::parse(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(text: &str) -> PoolCidr {
        PoolCidr::parse(text).expect("pool")
    }

    #[test]
    fn addresses_names_and_mac() {
        let plan = NetPlan::derive("hth", "0a1b2c3d4e", pool("10.213.0.0/16"), 3).expect("plan");
        assert_eq!(plan.host_addr, Ipv4Addr::new(10, 213, 0, 25));
        assert_eq!(plan.ns_addr, Ipv4Addr::new(10, 213, 0, 26));
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 213, 0, 29));
        assert_eq!(plan.guest_addr, Ipv4Addr::new(10, 213, 0, 30));
        assert_eq!(plan.guest_network(), Ipv4Addr::new(10, 213, 0, 28));
        assert_eq!(plan.prefix_len, 30);
        assert_eq!(plan.netns, "hth-0a1b2c3d4e");
        assert_eq!(plan.host_veth, "hth0a1b2c3d4e");
        assert_eq!(plan.ns_veth, "eth0");
        assert_eq!(plan.tap, "tap0");
        assert_eq!(plan.guest_mac, [0x02, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e]);
        assert_eq!(plan.guest_mac_string(), "02:0a:1b:2c:3d:4e");
    }

    #[test]
    fn blocks_do_not_overlap_and_cover_the_pool() {
        let p = pool("10.214.7.0/24");
        let first = NetPlan::derive("tn", "0000000000", p, 0).expect("first");
        assert_eq!(first.host_addr, Ipv4Addr::new(10, 214, 7, 1));
        assert_eq!(first.guest_addr, Ipv4Addr::new(10, 214, 7, 6));
        let last = NetPlan::derive("tn", "0000000000", p, 31).expect("last");
        assert_eq!(last.host_addr, Ipv4Addr::new(10, 214, 7, 249));
        assert_eq!(last.guest_addr, Ipv4Addr::new(10, 214, 7, 254));
        let second = NetPlan::derive("tn", "0000000000", p, 1).expect("second");
        assert_eq!(second.host_addr, Ipv4Addr::new(10, 214, 7, 9));
    }

    #[test]
    fn mac_is_unicast_and_locally_administered() {
        for id in ["0000000000", "ffffffffff", "0123456789", "abcdef0123"] {
            let plan = NetPlan::derive("hth", id, pool("10.213.0.0/16"), 0).expect("plan");
            assert_eq!(plan.guest_mac[0] & 0x01, 0, "{id}: multicast bit");
            assert_eq!(plan.guest_mac[0] & 0x02, 0x02, "{id}: local bit");
        }
        let a = NetPlan::derive("hth", "0000000001", pool("10.213.0.0/16"), 0).expect("a");
        let b = NetPlan::derive("hth", "0000000002", pool("10.213.0.0/16"), 0).expect("b");
        assert_ne!(a.guest_mac, b.guest_mac);
    }

    #[test]
    fn longest_names_fit_the_kernel_limit() {
        let plan = NetPlan::derive("abcde", "ffffffffff", pool("10.213.0.0/16"), 0).expect("plan");
        assert_eq!(plan.host_veth.len(), 15);
        assert!(plan.ns_veth.len() < 16 && plan.tap.len() < 16);
    }

    #[test]
    fn refuses_bad_inputs_naming_them() {
        let p = pool("10.214.7.0/24");
        let cases: [(&str, &str, u32, &str); 9] = [
            (
                "hth",
                "0a1b2c3d4e",
                32,
                "slot 32 is outside the address pool 10.214.7.0/24, which has 32 slots",
            ),
            ("hth", "0a1b2c3d4", 0, "\"0a1b2c3d4\""),
            ("hth", "0a1b2c3d4e5", 0, "\"0a1b2c3d4e5\""),
            ("hth", "0A1B2C3D4E", 0, "\"0A1B2C3D4E\""),
            ("hth", "0a1b2c3d4g", 0, "\"0a1b2c3d4g\""),
            ("toolong", "0a1b2c3d4e", 0, "\"toolong\""),
            ("", "0a1b2c3d4e", 0, "\"\""),
            ("1ab", "0a1b2c3d4e", 0, "\"1ab\""),
            ("h-t", "0a1b2c3d4e", 0, "\"h-t\""),
        ];
        for (prefix, id, slot, needle) in cases {
            let err = NetPlan::derive(prefix, id, p, slot)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{prefix:?} {id:?} {slot}: {err}");
        }
    }
}
