//! The addresses and names of one machine's network, derived from its id and its lease.
//! Pure: the same inputs always give the same plan, which is what lets every network
//! step and its undo find their objects after a crash.

use std::net::Ipv4Addr;

use crate::config::parse_pool;

/// The address pool: an IPv4 network cut into /29 blocks, one per machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCidr {
    base: Ipv4Addr,
    len: u8,
}

/// Addresses in one block.
const BLOCK: u32 = 8;

impl PoolCidr {
    /// Parses `a.b.c.d/len` (see `config::parse_pool` for the rules).
    pub fn parse(text: &str) -> Result<PoolCidr, String> {
        let (base, len) = parse_pool(text)?;
        Ok(PoolCidr { base, len })
    }

    /// How many /29 blocks the pool holds.
    pub fn slot_count(&self) -> u32 {
        (1u32 << (32 - u32::from(self.len))) / BLOCK
    }

    /// The first address of block `slot`, when the pool has it.
    pub fn block(&self, slot: u32) -> Option<Ipv4Addr> {
        (slot < self.slot_count()).then(|| Ipv4Addr::from(u32::from(self.base) + slot * BLOCK))
    }
}

/// One machine's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// The veth end in the root namespace.
    pub host_veth: String,
    /// The veth end inside the namespace.
    pub ns_veth: String,
    /// The tap device inside the namespace.
    pub tap: String,
    /// Address of `host_veth`.
    pub host_addr: Ipv4Addr,
    /// Address of `ns_veth`.
    pub ns_addr: Ipv4Addr,
    /// Address of the tap: the guest's gateway.
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest_addr: Ipv4Addr,
    /// Prefix length of every link network (/30).
    pub prefix_len: u8,
    /// The guest's MAC: locally administered, unicast, from the machine id.
    pub guest_mac: [u8; 6],
}

impl NetPlan {
    /// The plan of machine `machine_id` holding block `slot`. `None` when the slot is
    /// outside the pool.
    pub fn derive(prefix: &str, machine_id: &str, pool: &PoolCidr, slot: u32) -> Option<NetPlan> {
        let base = u32::from(pool.block(slot)?);
        let at = |offset: u32| Ipv4Addr::from(base + offset);
        let mut mac = [0x02u8, 0, 0, 0, 0, 0];
        let id = hex::decode(machine_id).unwrap_or_default();
        for (i, byte) in id.iter().take(5).enumerate() {
            mac[i + 1] = *byte;
        }
        Some(NetPlan {
            netns: format!("{prefix}-{machine_id}"),
            host_veth: format!("{prefix}{machine_id}"),
            ns_veth: "eth0".to_string(),
            tap: "tap0".to_string(),
            host_addr: at(1),
            ns_addr: at(2),
            gateway: at(5),
            guest_addr: at(6),
            prefix_len: 30,
            guest_mac: mac,
        })
    }

    /// The guest's /30 network (routed to the namespace from the host).
    pub fn guest_network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.guest_addr) & !0b11)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_addresses() {
        let pool = PoolCidr::parse("10.213.0.0/16").expect("pool");
        assert_eq!(pool.slot_count(), 8192);
        let plan = NetPlan::derive("hth", "0a1b2c3d4e", &pool, 3).expect("plan");
        assert_eq!(plan.host_addr, Ipv4Addr::new(10, 213, 0, 25));
        assert_eq!(plan.ns_addr, Ipv4Addr::new(10, 213, 0, 26));
        assert_eq!(plan.gateway, Ipv4Addr::new(10, 213, 0, 29));
        assert_eq!(plan.guest_addr, Ipv4Addr::new(10, 213, 0, 30));
        assert_eq!(plan.guest_network(), Ipv4Addr::new(10, 213, 0, 28));
        assert_eq!(plan.netns, "hth-0a1b2c3d4e");
        assert_eq!(plan.host_veth, "hth0a1b2c3d4e");
        assert!(plan.host_veth.len() <= 15);
        assert_eq!(plan.guest_mac, [0x02, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e]);
        assert!(NetPlan::derive("hth", "0a1b2c3d4e", &pool, 8192).is_none());
    }

    #[test]
    fn small_pool() {
        let pool = PoolCidr::parse("10.214.7.0/24").expect("pool");
        assert_eq!(pool.slot_count(), 32);
        assert_eq!(pool.block(31), Some(Ipv4Addr::new(10, 214, 7, 248)));
        assert!(PoolCidr::parse("10.214.7.0/31").is_err());
    }
}
