//! Who a guest may talk to, as nftables changes. Pure: this file only builds the batches
//! (see `nfnl`); `fabric` sends them.
//!
//! One table per daemon, `inet hearth_<prefix>`, so two daemons (or two test prefixes)
//! never touch each other's rules. Packets of a machine are recognised by its host veth
//! (`<prefix><id>`), the only way into or out of its namespace:
//!
//! ```text
//! input    iifname vmap @from_guest_in   -> m<id>_in:  not its IPv4 source? drop; goto host_access
//!          iif != lo, to the guest resolver: drop (dns.guests)
//! forward  iifname vmap @from_guest_fwd  -> m<id>_fwd: not its IPv4 source? drop; goto guest_forward
//!          oifname vmap @to_guest        -> m<id>_to:  replies, declared TCP ports; else drop
//! output   oifname vmap @to_guest        (the same chain: the host sees only declared ports)
//! host_access:   replies; the guest resolver's port 53 (dns.guests); the config's allow
//!                list; drop
//! guest_forward: replies; to the pool: drop (or, machine_to_machine, the peer's m<id>_to
//!                decides); with egress = "nat": to network.egress_allow: accept; to
//!                link-local, private and other special ranges (EGRESS_DENIED): drop;
//!                elsewhere: accept; with egress = "none": drop
//! postrouting (egress = "nat" only): from the pool to outside it: masquerade
//! ```
//!
//! The daemon's part (table, maps, base and shared chains) is rewritten whole at start;
//! a machine's part is its three chains and three map elements, written and removed in
//! one atomic batch each. The MAC half of anti-spoofing lives in the machine's namespace
//! (the only place the guest's frames are seen): [`guard_changes`], made by the network
//! step and removed with the namespace.

use std::net::Ipv4Addr;

use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook, Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage,
    Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute,
    SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute, TableFlags,
    TableMessage, Verdict, VerdictAttribute,
};
use rtnetlink::packet_core::{DefaultNla, NLM_F_APPEND, NLM_F_CREATE};

use super::nfnl::Change;
use super::plan::{NetPlan, parse_machine_id};
use super::pool::PoolCidr;

/// Where guests may go beyond the host and each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Nowhere.
    None,
    /// Out through the host's routes, masqueraded.
    Nat,
}

/// A transport protocol of the host allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl L4 {
    fn number(self) -> u8 {
        match self {
            L4::Tcp => libc::IPPROTO_TCP as u8,
            L4::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

/// A host port guests may reach (`udp/53`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort {
    /// Protocol.
    pub proto: L4,
    /// Port.
    pub port: u16,
}

impl HostPort {
    /// Parses `tcp/<port>` or `udp/<port>`.
    pub fn parse(text: &str) -> Result<HostPort, String> {
        let (proto, port) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} must be tcp/<port> or udp/<port>"))?;
        let proto = match proto {
            "tcp" => L4::Tcp,
            "udp" => L4::Udp,
            _ => return Err(format!("{text:?}: protocol must be tcp or udp")),
        };
        match port.parse::<u16>() {
            Ok(port) if port != 0 => Ok(HostPort { proto, port }),
            _ => Err(format!("{text:?}: port must be 1-65535")),
        }
    }
}

/// The daemon-wide policy, from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// `network.prefix`: names the table.
    pub prefix: String,
    /// `network.pool`: every guest address is in it.
    pub pool: PoolCidr,
    /// `network.egress`.
    pub egress: Egress,
    /// `network.machine_to_machine`.
    pub machine_to_machine: bool,
    /// `network.host_allow`.
    pub host_allow: Vec<HostPort>,
    /// The guest resolver (`dns.guests`): guests may reach port 53 of this address, over
    /// UDP and TCP, and nothing else of it.
    pub guest_dns: Option<Ipv4Addr>,
    /// `network.egress_allow`: networks guests reach with egress `nat` even inside
    /// [`EGRESS_DENIED`].
    pub egress_allow: Vec<Cidr>,
}

/// An IPv4 network: `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/len` (host bits must be zero).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a.b.c.d/len"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{len:?} is not a prefix length (0-32)"))?;
        let cidr = Cidr { network, len };
        if u32::from(network) & !u32::from_be_bytes(prefix_mask(len)) != 0 {
            return Err(format!("{text} has host bits set"));
        }
        Ok(cidr)
    }

    const fn new(a: u8, b: u8, c: u8, d: u8, len: u8) -> Cidr {
        Cidr {
            network: Ipv4Addr::new(a, b, c, d),
            len,
        }
    }
}

/// Where a guest with egress `nat` still may not go unless `network.egress_allow` lists
/// it: this host's neighbours and services, not the internet. Link-local holds the cloud
/// metadata address (169.254.169.254); the private and shared ranges hold the host's own
/// networks, its control plane and etcd; the rest are not destinations on the internet.
/// (The host's own addresses are not forwarded at all: `host_access` decides those.)
pub const EGRESS_DENIED: &[Cidr] = &[
    Cidr::new(0, 0, 0, 0, 8),      // "this network"
    Cidr::new(10, 0, 0, 0, 8),     // private
    Cidr::new(100, 64, 0, 0, 10),  // shared (carrier-grade NAT)
    Cidr::new(127, 0, 0, 0, 8),    // loopback
    Cidr::new(169, 254, 0, 0, 16), // link-local: cloud metadata
    Cidr::new(172, 16, 0, 0, 12),  // private
    Cidr::new(192, 0, 0, 0, 24),   // protocol assignments
    Cidr::new(192, 168, 0, 0, 16), // private
    Cidr::new(198, 18, 0, 0, 15),  // benchmarking
    Cidr::new(224, 0, 0, 0, 4),    // multicast
    Cidr::new(240, 0, 0, 0, 4),    // reserved, broadcast
];

/// The port guests send DNS questions to: resolv.conf has no way to name another.
pub const GUEST_DNS_PORT: u16 = 53;

impl PolicyConfig {
    /// The daemon's table.
    pub fn table(&self) -> String {
        table_name(&self.prefix)
    }
}

/// The table of the daemon with `prefix`.
pub fn table_name(prefix: &str) -> String {
    format!("hearth_{prefix}")
}

/// One machine's part of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachinePolicy {
    /// The machine id.
    pub id: String,
    /// Its host veth (`<prefix><id>`).
    pub host_veth: String,
    /// Its leased address.
    pub guest_ip: Ipv4Addr,
    /// Its declared TCP ports.
    pub ports: Vec<u16>,
}

const HOST_ACCESS: &str = "host_access";
const GUEST_FORWARD: &str = "guest_forward";
const MAP_IN: &str = "from_guest_in";
const MAP_FWD: &str = "from_guest_fwd";
const MAP_TO: &str = "to_guest";

/// The chain kinds of a machine, with the map that leads to each.
const MACHINE_CHAINS: [(&str, &str); 3] = [("in", MAP_IN), ("fwd", MAP_FWD), ("to", MAP_TO)];

/// A machine's chain of kind `kind`: `m<id>_<kind>`.
fn machine_chain(id: &str, kind: &str) -> String {
    format!("m{id}_{kind}")
}

/// The chain whose presence says the machine's policy is there (all three are written
/// in one batch, so one stands for all).
pub fn marker_chain(id: &str) -> String {
    machine_chain(id, "in")
}

/// The machine id a chain of the daemon's table belongs to, when it is a machine's.
pub fn machine_of_chain(chain: &str) -> Option<&str> {
    let rest = chain.strip_prefix('m')?;
    let (id, kind) = rest.split_once('_')?;
    let known = MACHINE_CHAINS.iter().any(|(k, _)| *k == kind);
    (known && parse_machine_id(id).is_some()).then_some(id)
}

/// The whole daemon part, rewritten: table, maps, shared and base chains with their
/// rules, and the masquerade chain only with egress `nat` (removed otherwise). Machine
/// chains and map elements are kept. Idempotent: it may run at every start.
pub(crate) fn daemon_changes(cfg: &PolicyConfig) -> Vec<Change> {
    let table = cfg.table();
    let mut out = vec![new_table(&table)];
    for (id, map) in [MAP_IN, MAP_FWD, MAP_TO].into_iter().enumerate() {
        out.push(change(
            NfTablesMessage::NewSet(SetMessage {
                attributes: vec![
                    SetAttribute::Table(table.clone()),
                    SetAttribute::Name(map.to_string()),
                    SetAttribute::Flags(SetFlags::Map),
                    SetAttribute::KeyType(TYPE_IFNAME),
                    SetAttribute::KeyLen(IFNAMSIZ as u32),
                    SetAttribute::DataType(NFT_DATA_VERDICT),
                    SetAttribute::Id(id as u32 + 1),
                    // For `nft list` only: the key is a host-order string (type 0 is
                    // the key's byte order, 1 is "host").
                    SetAttribute::UserData(vec![0, 4, 1, 0, 0, 0]),
                ],
            }),
            NLM_F_CREATE,
            format!("create map {map} in {table}"),
        ));
    }

    let mut host_access = vec![Rule::new().replies().verdict(ACCEPT)];
    if let Some(resolver) = cfg.guest_dns {
        for proto in [L4::Udp, L4::Tcp] {
            host_access.push(
                Rule::new()
                    .ipv4()
                    .destination_is(resolver)
                    .dport(proto, GUEST_DNS_PORT)
                    .verdict(ACCEPT),
            );
        }
    }
    for allowed in &cfg.host_allow {
        host_access.push(
            Rule::new()
                .dport(allowed.proto, allowed.port)
                .verdict(ACCEPT),
        );
    }
    host_access.push(Rule::new().verdict(DROP));
    push_chain(&mut out, &table, HOST_ACCESS, None, host_access);

    let to_pool = if cfg.machine_to_machine { RETURN } else { DROP };
    let elsewhere = match cfg.egress {
        Egress::Nat => ACCEPT,
        Egress::None => DROP,
    };
    let mut guest_forward = vec![
        Rule::new().replies().verdict(ACCEPT),
        Rule::new()
            .ipv4()
            .addr_in(16, Operator::Equal, &cfg.pool)
            .verdict(to_pool),
    ];
    if cfg.egress == Egress::Nat {
        for allowed in &cfg.egress_allow {
            guest_forward.push(Rule::new().ipv4().daddr_in(allowed).verdict(ACCEPT));
        }
        for denied in EGRESS_DENIED {
            guest_forward.push(Rule::new().ipv4().daddr_in(denied).verdict(DROP));
        }
    }
    guest_forward.push(Rule::new().verdict(elsewhere));
    push_chain(&mut out, &table, GUEST_FORWARD, None, guest_forward);

    let vmap = |key: MetaKey, map: &str| Rule::new().vmap(key, map).done();
    let mut input = vec![vmap(MetaKey::Iifname, MAP_IN)];
    // The guest resolver answers guests (decided above, through their chains) and the
    // host itself (on `lo`, whose index is 1 in every namespace); from anywhere else (a
    // neighbour that routes the pool here) it is not there.
    if let Some(resolver) = cfg.guest_dns {
        input.push(
            Rule::new()
                .meta_is(
                    MetaKey::Iif,
                    Operator::NotEqual,
                    1u32.to_ne_bytes().to_vec(),
                )
                .ipv4()
                .destination_is(resolver)
                .verdict(DROP),
        );
    }
    push_chain(
        &mut out,
        &table,
        "input",
        Some(("filter", InetHookNumber::LocalIn, 0)),
        input,
    );
    push_chain(
        &mut out,
        &table,
        "forward",
        Some(("filter", InetHookNumber::Forward, 0)),
        vec![
            vmap(MetaKey::Iifname, MAP_FWD),
            vmap(MetaKey::Oifname, MAP_TO),
        ],
    );
    push_chain(
        &mut out,
        &table,
        "output",
        Some(("filter", InetHookNumber::LocalOut, 0)),
        vec![vmap(MetaKey::Oifname, MAP_TO)],
    );

    let nat = Some(("nat", InetHookNumber::PostRouting, NAT_SRC_PRIORITY));
    match cfg.egress {
        Egress::Nat => {
            let masq = Rule::new()
                .ipv4()
                .addr_in(12, Operator::Equal, &cfg.pool)
                .addr_in(16, Operator::NotEqual, &cfg.pool)
                .masquerade();
            push_chain(&mut out, &table, "postrouting", nat, vec![masq]);
        }
        Egress::None => {
            // Create it (harmless when it exists), then delete it: gone either way.
            out.push(new_chain(&table, "postrouting", nat));
            out.push(change(
                NfTablesMessage::DeleteChain(ChainMessage {
                    attributes: vec![
                        ChainAttribute::Table(table.clone()),
                        ChainAttribute::Name("postrouting".to_string()),
                    ],
                }),
                0,
                format!("delete chain postrouting of {table} (egress none)"),
            ));
        }
    }
    out
}

/// One machine's chains and map elements, written whole (rules replaced). Idempotent.
pub(crate) fn machine_changes(cfg: &PolicyConfig, machine: &MachinePolicy) -> Vec<Change> {
    let table = cfg.table();
    let id = &machine.id;
    let mut out = Vec::new();
    let from_guest = |next: &str| {
        vec![
            Rule::new()
                .meta_is(MetaKey::Nfproto, Operator::NotEqual, vec![NFPROTO_IPV4])
                .verdict(DROP),
            Rule::new()
                .ipv4()
                .source_is_not(machine.guest_ip)
                .verdict(DROP),
            Rule::new().goto(next),
        ]
    };
    push_chain(
        &mut out,
        &table,
        &machine_chain(id, "in"),
        None,
        from_guest(HOST_ACCESS),
    );
    push_chain(
        &mut out,
        &table,
        &machine_chain(id, "fwd"),
        None,
        from_guest(GUEST_FORWARD),
    );
    let mut to = vec![Rule::new().replies().verdict(ACCEPT)];
    for port in &machine.ports {
        to.push(Rule::new().dport(L4::Tcp, *port).verdict(ACCEPT));
    }
    to.push(Rule::new().verdict(DROP));
    push_chain(&mut out, &table, &machine_chain(id, "to"), None, to);
    for (kind, map) in MACHINE_CHAINS {
        out.push(element(
            &table,
            map,
            &machine.host_veth,
            &machine_chain(id, kind),
            true,
        ));
    }
    out
}

/// Removes a machine's chains and map elements. Only valid when its chains exist (the
/// caller checks [`marker_chain`]); each object is made sure of first, so the batch
/// holds however much of the machine's part is left.
pub(crate) fn release_changes(prefix: &str, id: &str, host_veth: &str) -> Vec<Change> {
    let table = table_name(prefix);
    let mut out = Vec::new();
    for (kind, _) in MACHINE_CHAINS {
        out.push(new_chain(&table, &machine_chain(id, kind), None));
    }
    for (kind, map) in MACHINE_CHAINS {
        out.push(element(
            &table,
            map,
            host_veth,
            &machine_chain(id, kind),
            true,
        ));
    }
    for (kind, map) in MACHINE_CHAINS {
        out.push(element(
            &table,
            map,
            host_veth,
            &machine_chain(id, kind),
            false,
        ));
    }
    for (kind, _) in MACHINE_CHAINS {
        let name = machine_chain(id, kind);
        out.push(change(
            NfTablesMessage::DeleteChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.clone()),
                    ChainAttribute::Name(name.clone()),
                ],
            }),
            0,
            format!("delete chain {name} of {table}"),
        ));
    }
    out
}

/// The table inside a machine's namespace that drops every frame from the tap whose
/// source MAC or IPv4 address is not the guest's, and anything from it that is not IPv4
/// (ARP is not seen by this family and stays allowed). Idempotent (rules replaced).
pub(crate) fn guard_changes(plan: &NetPlan) -> Vec<Change> {
    let table = GUARD_TABLE.to_string();
    let mut out = vec![new_table(&table)];
    let from_tap =
        || Rule::new().meta_is(MetaKey::Iifname, Operator::Equal, ifname_bytes(&plan.tap));
    // Counted, so an operator (and a test) can see spoofing being dropped.
    let rules = vec![
        from_tap()
            .meta_is(
                MetaKey::Iftype,
                Operator::Equal,
                ARPHRD_ETHER.to_ne_bytes().to_vec(),
            )
            .payload(LINK_HEADER, 6, 6)
            .cmp(Operator::NotEqual, plan.guest_mac.to_vec())
            .counter()
            .verdict(DROP),
        from_tap()
            .meta_is(MetaKey::Nfproto, Operator::NotEqual, vec![NFPROTO_IPV4])
            .counter()
            .verdict(DROP),
        from_tap()
            .ipv4()
            .source_is_not(plan.guest_addr)
            .counter()
            .verdict(DROP),
    ];
    push_chain(
        &mut out,
        &table,
        "prerouting",
        Some(("filter", InetHookNumber::PreRouting, RAW_PRIORITY)),
        rules,
    );
    out
}

/// The table [`guard_changes`] makes in a machine's namespace.
pub const GUARD_TABLE: &str = "hearth_guard";

// --- nftables constants (include/uapi/linux/netfilter/nf_tables.h, nftables' datatypes)

const IFNAMSIZ: usize = 16;
const TYPE_IFNAME: u32 = 41;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFPROTO_IPV4: u8 = 2;
const ARPHRD_ETHER: u16 = 1;
const LINK_HEADER: u32 = 0;
const NETWORK_HEADER: u32 = 1;
const TRANSPORT_HEADER: u32 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_REG_1: u32 = 1;
/// `ct state` bits of an established and a related connection.
const CT_ESTABLISHED_RELATED: u32 = 0b110;
const RAW_PRIORITY: i32 = -300;
const NAT_SRC_PRIORITY: i32 = 100;
const DROP: Verdict = Verdict::Other(0);
const ACCEPT: Verdict = Verdict::Other(1);
const RETURN: Verdict = Verdict::Return;

type Expr = ListAttribute<ExpressionAttribute>;

fn change(message: NfTablesMessage, flags: u16, what: String) -> Change {
    Change {
        family: NetfilterProtoFamily::Inet,
        message,
        flags,
        what,
    }
}

/// Creates table `inet <name>`, or keeps it.
fn new_table(name: &str) -> Change {
    change(
        NfTablesMessage::NewTable(TableMessage {
            attributes: vec![
                TableAttribute::Name(name.to_string()),
                TableAttribute::Flags(TableFlags::default()),
            ],
        }),
        NLM_F_CREATE,
        format!("create table inet {name}"),
    )
}

fn new_chain(table: &str, name: &str, hook: Option<(&str, InetHookNumber, i32)>) -> Change {
    let mut attributes = vec![
        ChainAttribute::Table(table.to_string()),
        ChainAttribute::Name(name.to_string()),
    ];
    if let Some((kind, number, priority)) = hook {
        attributes.push(ChainAttribute::Hook(vec![
            Hook::Number(number.into()),
            Hook::Priority(priority as u32),
        ]));
        attributes.push(ChainAttribute::Policy(1));
        attributes.push(ChainAttribute::Type(kind.to_string()));
    }
    change(
        NfTablesMessage::NewChain(ChainMessage { attributes }),
        NLM_F_CREATE,
        format!("create chain {name} of {table}"),
    )
}

/// Creates the chain (or keeps it), drops its rules, and appends `rules`.
fn push_chain(
    out: &mut Vec<Change>,
    table: &str,
    name: &str,
    hook: Option<(&str, InetHookNumber, i32)>,
    rules: Vec<Vec<Expr>>,
) {
    out.push(new_chain(table, name, hook));
    out.push(change(
        NfTablesMessage::DeleteRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(table.to_string()),
                RuleAttribute::Chain(name.to_string()),
            ],
        }),
        0,
        format!("flush chain {name} of {table}"),
    ));
    for (i, exprs) in rules.into_iter().enumerate() {
        out.push(change(
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(table.to_string()),
                    RuleAttribute::Chain(name.to_string()),
                    RuleAttribute::Expressions(exprs),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND,
            format!("add rule {} to chain {name} of {table}", i + 1),
        ));
    }
}

/// Adds (`add`) or deletes a map element `ifname : jump chain`.
fn element(table: &str, map: &str, ifname: &str, chain: &str, add: bool) -> Change {
    let message = SetElementMessage {
        attributes: vec![
            SetElementList::Table(table.to_string()),
            SetElementList::Set(map.to_string()),
            SetElementList::Elements(vec![ListAttribute::Element(vec![
                SetElementAttribute::Key(DataAttribute::Value(ifname_bytes(ifname))),
                SetElementAttribute::Data(DataAttribute::Verdict(vec![
                    VerdictAttribute::Code(Verdict::Jump),
                    VerdictAttribute::Chain(chain.to_string()),
                ])),
            ])]),
        ],
    };
    if add {
        change(
            NfTablesMessage::NewSetElement(message),
            NLM_F_CREATE,
            format!("add {ifname} to map {map} of {table}"),
        )
    } else {
        change(
            NfTablesMessage::DeleteSetElement(message),
            0,
            format!("delete {ifname} from map {map} of {table}"),
        )
    }
}

fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.resize(IFNAMSIZ, 0);
    bytes
}

fn prefix_mask(len: u8) -> [u8; 4] {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    mask.to_be_bytes()
}

/// One rule's expressions, built in the order they run. Every match loads into
/// register 1 and compares there; the last expression is the verdict.
#[derive(Default)]
struct Rule(Vec<Expr>);

impl Rule {
    fn new() -> Rule {
        Rule::default()
    }

    fn push(mut self, expr: Expressions) -> Rule {
        self.0.push(expr.into());
        self
    }

    fn raw(mut self, name: &str, attributes: Vec<DefaultNla>) -> Rule {
        self.0.push(ListAttribute::Element(vec![
            ExpressionAttribute::Name(name.to_string()),
            ExpressionAttribute::Data(Expressions::Other {
                expression_type: name.to_string(),
                attributes,
            }),
        ]));
        self
    }

    fn meta(self, key: MetaKey) -> Rule {
        self.push(Expressions::Meta(vec![
            Meta::Key(key),
            Meta::DestinationRegister(Register::Reg1),
        ]))
    }

    fn cmp(self, op: Operator, data: Vec<u8>) -> Rule {
        self.push(Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(op),
            Cmp::Data(DataAttribute::Value(data)),
        ]))
    }

    /// `meta <key> <op> <data>`.
    fn meta_is(self, key: MetaKey, op: Operator, data: Vec<u8>) -> Rule {
        self.meta(key).cmp(op, data)
    }

    /// Only IPv4 packets go on (nftables' implicit dependency of every `ip` match).
    fn ipv4(self) -> Rule {
        self.meta_is(MetaKey::Nfproto, Operator::Equal, vec![NFPROTO_IPV4])
    }

    fn payload(self, base: u32, offset: u32, len: u32) -> Rule {
        self.push(Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(base),
            Payload::Offset(offset),
            Payload::Len(len),
        ]))
    }

    fn mask(self, mask: [u8; 4]) -> Rule {
        self.push(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(mask.to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]))
    }

    /// `ip saddr` (offset 12) or `ip daddr` (offset 16) `<op> <pool>`.
    fn addr_in(self, offset: u32, op: Operator, pool: &PoolCidr) -> Rule {
        self.payload(NETWORK_HEADER, offset, 4)
            .mask(prefix_mask(pool.prefix_len()))
            .cmp(op, pool.network().octets().to_vec())
    }

    /// `ip daddr <network>/<len>`.
    fn daddr_in(self, net: &Cidr) -> Rule {
        self.payload(NETWORK_HEADER, 16, 4)
            .mask(prefix_mask(net.len))
            .cmp(Operator::Equal, net.network.octets().to_vec())
    }

    /// `ip saddr != <addr>`.
    fn source_is_not(self, addr: Ipv4Addr) -> Rule {
        self.payload(NETWORK_HEADER, 12, 4)
            .cmp(Operator::NotEqual, addr.octets().to_vec())
    }

    /// `ip daddr == <addr>`.
    fn destination_is(self, addr: Ipv4Addr) -> Rule {
        self.payload(NETWORK_HEADER, 16, 4)
            .cmp(Operator::Equal, addr.octets().to_vec())
    }

    /// `meta l4proto <proto> th dport <port>`.
    fn dport(self, proto: L4, port: u16) -> Rule {
        self.meta_is(MetaKey::L4Proto, Operator::Equal, vec![proto.number()])
            .payload(TRANSPORT_HEADER, 2, 2)
            .cmp(Operator::Equal, port.to_be_bytes().to_vec())
    }

    /// `ct state established,related`.
    fn replies(self) -> Rule {
        let be32 = |v: u32| v.to_be_bytes().to_vec();
        self.raw(
            "ct",
            vec![
                DefaultNla::new(NFTA_CT_DREG, be32(NFT_REG_1)),
                DefaultNla::new(NFTA_CT_KEY, be32(NFT_CT_STATE)),
            ],
        )
        .push(Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(
                CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
            )),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]))
        .cmp(Operator::NotEqual, vec![0; 4])
    }

    /// `counter`.
    fn counter(self) -> Rule {
        self.raw("counter", Vec::new())
    }

    /// `iifname|oifname vmap @<map>`.
    fn vmap(self, key: MetaKey, map: &str) -> Rule {
        self.meta(key).push(Expressions::Lookup(vec![
            Lookup::Set(map.to_string()),
            Lookup::SourceRegister(Register::Reg1),
            Lookup::DestinationRegister(Register::Verdict),
        ]))
    }

    fn verdict(self, code: Verdict) -> Vec<Expr> {
        self.push(Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(code)])),
        ]))
        .0
    }

    fn goto(self, chain: &str) -> Vec<Expr> {
        self.push(Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![
                VerdictAttribute::Code(Verdict::Goto),
                VerdictAttribute::Chain(chain.to_string()),
            ])),
        ]))
        .0
    }

    fn masquerade(self) -> Vec<Expr> {
        self.raw("masq", Vec::new()).0
    }

    fn done(self) -> Vec<Expr> {
        self.0
    }
}
