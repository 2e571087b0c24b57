//! Host networking for machines: network namespace, veth pair, tap device, addresses, routes.
