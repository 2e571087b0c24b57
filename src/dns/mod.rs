//! The embedded DNS server: answers for this host's published machines, from the routes
//! mirror (`route::RouteTable`), so a name resolves exactly while its machine is
//! published (after the guest is ready, until teardown begins).
//!
//! Under `dns.domain` (say `hearth.internal`):
//! - `<name>.<domain>` and `<id>.vm.<domain>`: A, the guest's address;
//! - `_<port>._tcp.<name>.<domain>` for each declared port: SRV to `<name>.<domain>`;
//! - any other name inside the domain: NXDOMAIN (NOERROR with no answer when the name
//!   exists but has no record of the asked type, or only has names below it: `vm`,
//!   `_tcp.<name>`);
//! - a name outside the domain: REFUSED (it is not a resolver for anything else).
//!
//! The answer itself is pure ([`answer`]); [`Handler`] turns it into hickory's types.

pub mod settings;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::machine::spec::ID_LABEL;
use crate::route::RouteTable;

/// What a question gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Not a name this server is authoritative for.
    Refused,
    /// No such name in the domain.
    NxDomain,
    /// These records (empty: the name exists, without records of that type).
    Records(Vec<Found>),
}

/// One record of an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// An address.
    A(Ipv4Addr),
    /// A service on `port` of the host named `target` (relative to the domain).
    Srv {
        /// The TCP port.
        port: u16,
        /// `<name>` of the machine.
        target: String,
    },
}

/// Answers `qname` (any case, with or without the final dot) for `qtype` under `domain`.
pub fn answer(routes: &RouteTable, domain: &str, qname: &str, qtype: RecordType) -> Answer {
    let qname = qname.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(head) = qname
        .strip_suffix(&domain)
        .and_then(|head| head.strip_suffix('.'))
    else {
        return if qname == domain {
            Answer::Records(Vec::new())
        } else {
            Answer::Refused
        };
    };
    let labels: Vec<&str> = head.split('.').collect();
    let address = |route: Option<crate::route::Route>| match route {
        None => Answer::NxDomain,
        Some(route) if qtype == RecordType::A || qtype == RecordType::ANY => {
            Answer::Records(vec![Found::A(route.ip)])
        }
        Some(_) => Answer::Records(Vec::new()),
    };
    match labels.as_slice() {
        [id, ID_LABEL] => address(routes.by_id(id)),
        // Names with names below them but no records of their own (RFC 8020: NOERROR,
        // so a resolver walking down label by label goes on).
        // No machine is called `vm` (the name is refused), so it is always this case.
        [ID_LABEL] => Answer::Records(Vec::new()),
        ["_tcp", name] if routes.by_name(name).is_some() => Answer::Records(Vec::new()),
        [name] => address(routes.by_name(name)),
        [service, "_tcp", name] => {
            let Some(port) = service
                .strip_prefix('_')
                .and_then(|p| p.parse::<u16>().ok())
            else {
                return Answer::NxDomain;
            };
            match routes.by_name(name) {
                Some(route) if route.ports.contains(&port) => {
                    if qtype == RecordType::SRV || qtype == RecordType::ANY {
                        Answer::Records(vec![Found::Srv {
                            port,
                            target: route.name,
                        }])
                    } else {
                        Answer::Records(Vec::new())
                    }
                }
                _ => Answer::NxDomain,
            }
        }
        _ => Answer::NxDomain,
    }
}

/// The hickory request handler over the routes mirror.
pub struct Handler {
    routes: RouteTable,
    domain: String,
    ttl: u32,
}

impl Handler {
    /// Answers for `routes` under `domain`, with records that live `ttl` seconds.
    pub fn new(routes: RouteTable, domain: &str, ttl: u32) -> Handler {
        Handler {
            routes,
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            ttl,
        }
    }

    fn records(&self, qname: &Name, found: Vec<Found>) -> Vec<Record> {
        found
            .into_iter()
            .filter_map(|found| {
                let rdata = match found {
                    Found::A(ip) => RData::A(A(ip)),
                    Found::Srv { port, target } => {
                        let target = Name::from_ascii(format!("{target}.{}.", self.domain)).ok()?;
                        RData::SRV(SRV::new(0, 0, port, target))
                    }
                };
                Some(Record::from_rdata(qname.clone(), self.ttl, rdata))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let queries = request.queries.queries();
        let outcome = match queries {
            [query] => {
                let qname: Name = query.name().into();
                match answer(
                    &self.routes,
                    &self.domain,
                    &qname.to_ascii(),
                    query.query_type(),
                ) {
                    Answer::Refused => {
                        response
                            .send_response(
                                builder.error_msg(&request.metadata, ResponseCode::Refused),
                            )
                            .await
                    }
                    Answer::NxDomain => {
                        metadata.authoritative = true;
                        metadata.response_code = ResponseCode::NXDomain;
                        response
                            .send_response(builder.build_no_records(metadata))
                            .await
                    }
                    Answer::Records(found) => {
                        metadata.authoritative = true;
                        let records = self.records(&qname, found);
                        response
                            .send_response(builder.build(metadata, records.iter(), [], [], []))
                            .await
                    }
                }
            }
            _ => {
                response
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::FormErr))
                    .await
            }
        };
        outcome.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "dns: the answer could not be sent");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        })
    }
}

/// How long a TCP client may stay idle before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// Binds UDP and TCP on `address` (the same port on both; port 0 picks one).
pub async fn bind(
    address: &str,
) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let udp = tokio::net::UdpSocket::bind(address).await?;
    let bound = udp.local_addr()?;
    let tcp = tokio::net::TcpListener::bind(bound).await?;
    Ok((udp, tcp))
}

/// Most TCP connections one client address may hold open to the DNS server (a guest's
/// resolver needs one at a time; a few for retries).
pub const TCP_PER_CLIENT: usize = 4;
/// Most TCP connections all clients together may hold: a guest cannot take the
/// daemon's descriptors (which it needs for pidfds, taps, the store) through DNS.
pub const TCP_TOTAL: usize = 64;

/// Serves `handler` on every pair of bound sockets until `stop` resolves.
///
/// UDP goes to hickory directly. TCP is accepted here, where connections are counted per
/// client address and in total ([`TCP_PER_CLIENT`], [`TCP_TOTAL`]); one over either
/// bound is closed at once (see [`crate::admit`]), one within is
/// relayed to hickory's own listener on loopback, which closes it after [`TCP_IDLE`].
pub async fn serve(
    handler: Handler,
    sockets: Vec<(tokio::net::UdpSocket, tokio::net::TcpListener)>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut server = hickory_server::Server::new(handler);
    let inner = match tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "dns: no loopback listener for TCP; serving UDP only");
            for (udp, _) in sockets {
                server.register_socket(udp);
            }
            stop.await;
            let _ = server.shutdown_gracefully().await;
            return;
        }
    };
    let inner_addr = inner.local_addr();
    server.register_listener(inner, TCP_IDLE, 64);
    let limits = crate::admit::Limits::new("dns", TCP_PER_CLIENT, TCP_TOTAL);
    let mut guards = tokio::task::JoinSet::new();
    for (udp, tcp) in sockets {
        server.register_socket(udp);
        if let Ok(inner_addr) = inner_addr {
            guards.spawn(guard_tcp(tcp, inner_addr, limits.clone()));
        }
    }
    stop.await;
    guards.abort_all();
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::debug!(error = %e, "dns: stopped with an error");
    }
}

/// Accepts on `outer` within `limits`, relaying each admitted connection to `inner`.
async fn guard_tcp(
    outer: tokio::net::TcpListener,
    inner: SocketAddr,
    limits: crate::admit::Limits,
) {
    loop {
        let (mut stream, peer) = match outer.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::debug!(error = %e, "dns: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = limits.admit(peer.ip()) else {
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(mut upstream) = tokio::net::TcpStream::connect(inner).await {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            }
        });
    }
}

/// The address a pair of sockets answers on.
pub fn local(sockets: &(tokio::net::UdpSocket, tokio::net::TcpListener)) -> Option<SocketAddr> {
    sockets.0.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;

    fn table() -> RouteTable {
        let routes = RouteTable::default();
        routes.insert(Route {
            machine_id: "0a1b2c3d4e".into(),
            name: "web".into(),
            ip: Ipv4Addr::new(10, 213, 0, 6),
            ports: vec![80, 8080],
        });
        routes
    }

    #[test]
    fn names_ids_and_services_resolve_under_the_domain() {
        let routes = table();
        let ip = Found::A(Ipv4Addr::new(10, 213, 0, 6));
        for qname in [
            "web.hearth.internal.",
            "WEB.Hearth.Internal",
            "0a1b2c3d4e.vm.hearth.internal",
        ] {
            assert_eq!(
                answer(&routes, "hearth.internal", qname, RecordType::A),
                Answer::Records(vec![Found::A(Ipv4Addr::new(10, 213, 0, 6))]),
                "{qname}"
            );
        }
        assert_eq!(
            answer(
                &routes,
                "hearth.internal.",
                "_8080._tcp.web.hearth.internal.",
                RecordType::SRV
            ),
            Answer::Records(vec![Found::Srv {
                port: 8080,
                target: "web".into()
            }])
        );
        assert_eq!(
            answer(
                &routes,
                "hearth.internal",
                "web.hearth.internal",
                RecordType::AAAA
            ),
            Answer::Records(Vec::new()),
            "the name exists, with no IPv6 address"
        );
        let _ = ip;
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_domains_refused() {
        let routes = table();
        for qname in [
            "api.hearth.internal",
            "ffff.vm.hearth.internal",
            "_443._tcp.web.hearth.internal",
            "_http._tcp.web.hearth.internal",
            "a.b.web.hearth.internal",
        ] {
            assert_eq!(
                answer(&routes, "hearth.internal", qname, RecordType::A),
                Answer::NxDomain,
                "{qname}"
            );
        }
        for qname in [
            "example.com",
            "web.hearth.internal.evil",
            "xhearth.internal",
        ] {
            assert_eq!(
                answer(&routes, "hearth.internal", qname, RecordType::A),
                Answer::Refused,
                "{qname}"
            );
        }
    }

    #[test]
    fn names_with_names_below_them_are_not_nxdomain() {
        let routes = table();
        for qname in ["vm.hearth.internal", "_tcp.web.hearth.internal"] {
            assert_eq!(
                answer(&routes, "hearth.internal", qname, RecordType::A),
                Answer::Records(Vec::new()),
                "{qname}"
            );
        }
        assert_eq!(
            answer(
                &routes,
                "hearth.internal",
                "_tcp.api.hearth.internal",
                RecordType::A
            ),
            Answer::NxDomain
        );
    }

    #[test]
    fn a_removed_route_stops_resolving() {
        let routes = table();
        routes.remove("0a1b2c3d4e");
        assert_eq!(
            answer(
                &routes,
                "hearth.internal",
                "web.hearth.internal",
                RecordType::A
            ),
            Answer::NxDomain
        );
        assert!(routes.is_empty());
    }
}
