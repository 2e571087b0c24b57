//! The address pool machines' networks are cut from: one IPv4 network, split into /29
//! blocks, one block per machine. Parsing lives here (not in the config) so that every
//! user of a pool holds a value that was validated once.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Addresses in one machine's block (a /29: two /30 link networks).
pub(crate) const BLOCK_SIZE: u32 = 8;

/// The shortest pool prefix accepted. A /8 already holds two million blocks; anything
/// wider is a typo, not a plan.
const MIN_PREFIX: u8 = 8;

/// The longest pool prefix accepted: a /29 is exactly one block.
const MAX_PREFIX: u8 = 29;

/// Why a pool text was refused. Every message quotes the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No `/` separating address and prefix length.
    #[error("address pool {0:?} is not a CIDR like 10.213.0.0/16")]
    NotCidr(String),
    /// The part before `/` is not an IPv4 address.
    #[error("address pool {text:?}: {address:?} is not an IPv4 address")]
    Address {
        /// The whole pool text.
        text: String,
        /// The address part.
        address: String,
    },
    /// The part after `/` is not a number in range.
    #[error("address pool {text:?}: prefix length {len:?} must be a number from /8 to /29")]
    PrefixLength {
        /// The whole pool text.
        text: String,
        /// The prefix length part.
        len: String,
    },
    /// The address has bits set below the prefix (`10.213.0.1/16`).
    #[error("address pool {text:?}: {address} has host bits set for /{len} (network is {network})")]
    HostBits {
        /// The whole pool text.
        text: String,
        /// The address given.
        address: Ipv4Addr,
        /// The prefix length given.
        len: u8,
        /// The network the text probably meant.
        network: Ipv4Addr,
    },
}

/// An IPv4 network cut into /29 blocks; block `k` starts at network + 8k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolCidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl PoolCidr {
    /// Parses `a.b.c.d/len` with `len` from 8 to 29 and no host bits set.
    pub fn parse(text: &str) -> Result<PoolCidr, PoolError> {
        let (address, len) = text
            .split_once('/')
            .ok_or_else(|| PoolError::NotCidr(text.to_string()))?;
        let address: Ipv4Addr = address.parse().map_err(|_| PoolError::Address {
            text: text.to_string(),
            address: address.to_string(),
        })?;
        let prefix_len = len
            .parse::<u8>()
            .ok()
            .filter(|l| (MIN_PREFIX..=MAX_PREFIX).contains(l))
            .ok_or_else(|| PoolError::PrefixLength {
                text: text.to_string(),
                len: len.to_string(),
            })?;
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        let network = Ipv4Addr::from(u32::from(address) & mask);
        if network != address {
            return Err(PoolError::HostBits {
                text: text.to_string(),
                address,
                len: prefix_len,
                network,
            });
        }
        Ok(PoolCidr {
            network,
            prefix_len,
        })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// How many /29 blocks (machines) the pool holds.
    pub fn slot_count(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix_len))) / BLOCK_SIZE
    }

    /// The block the guest resolver takes when guests resolve (`dns.guests`): the last
    /// one, never leased. `None` for a pool of one block, which has none to spare.
    pub fn resolver_slot(&self) -> Option<u32> {
        let last = self.slot_count().checked_sub(1)?;
        (last > 0).then_some(last)
    }

    /// The guest resolver's address: the first host address of [`Self::resolver_slot`].
    pub fn resolver_address(&self) -> Option<Ipv4Addr> {
        let block = self.block(self.resolver_slot()?)?;
        Some(Ipv4Addr::from(u32::from(block) + 1))
    }

    /// The first address of block `slot`, or `None` when the pool has no such block.
    pub fn block(&self, slot: u32) -> Option<Ipv4Addr> {
        (slot < self.slot_count())
            .then(|| Ipv4Addr::from(u32::from(self.network) + slot * BLOCK_SIZE))
    }
}

impl FromStr for PoolCidr {
    type Err = PoolError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        PoolCidr::parse(text)
    }
}

impl fmt::Display for PoolCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_counts_blocks() {
        let pool = PoolCidr::parse("10.213.0.0/16").expect("pool");
        assert_eq!(pool.network(), Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(pool.prefix_len(), 16);
        assert_eq!(pool.slot_count(), 8192);
        assert_eq!(pool.to_string(), "10.213.0.0/16");
        assert_eq!("10.213.0.0/16".parse::<PoolCidr>(), Ok(pool));

        let small = PoolCidr::parse("10.214.7.0/24").expect("pool");
        assert_eq!(small.slot_count(), 32);
        assert_eq!(small.block(0), Some(Ipv4Addr::new(10, 214, 7, 0)));
        assert_eq!(small.block(31), Some(Ipv4Addr::new(10, 214, 7, 248)));
        assert_eq!(small.block(32), None);

        assert_eq!(small.resolver_slot(), Some(31));
        assert_eq!(
            small.resolver_address(),
            Some(Ipv4Addr::new(10, 214, 7, 249))
        );

        let one = PoolCidr::parse("192.168.9.8/29").expect("pool");
        assert_eq!(one.slot_count(), 1);
        assert_eq!(one.resolver_slot(), None);
        assert_eq!(one.block(0), Some(Ipv4Addr::new(192, 168, 9, 8)));
        assert_eq!(one.block(1), None);

        let wide = PoolCidr::parse("10.0.0.0/8").expect("pool");
        assert_eq!(wide.slot_count(), 1 << 21);
        assert_eq!(
            wide.block((1 << 21) - 1),
            Some(Ipv4Addr::new(10, 255, 255, 248))
        );
    }

    #[test]
    fn refuses_bad_text_and_names_it() {
        let cases = [
            ("10.213.0.0", "10.213.0.0"),
            ("10.213.0/16", "10.213.0"),
            ("10.213.0.0/", "prefix length"),
            ("10.213.0.0/x", "\"x\""),
            ("10.213.0.0/30", "\"30\""),
            ("10.213.0.0/7", "\"7\""),
            ("10.213.0.0/-1", "\"-1\""),
            ("10.213.0.1/16", "network is 10.213.0.0"),
            ("", "not a CIDR"),
        ];
        for (text, needle) in cases {
            let err = PoolCidr::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{text:?}: {err}");
        }
    }
}
