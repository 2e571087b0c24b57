"""A control plane written in Python drives a machine's life through hearthd's socket.

Run by tests/python_client.rs as

    python lifecycle.py unix:SOCKET STUBS_DIR TAG
    python lifecycle.py HOST:PORT STUBS_DIR TAG CA CERT KEY

The first form talks to hearthd's Unix socket; the second to its TCP listener with mutual
TLS (the CA that signed the daemon's certificate, and the client's certificate and key).
TAG keeps request ids and names of one run apart from another's. The stubs are generated
from proto/ by grpc_tools.protoc at test time. The channel uses grpcio's default settings
(no grpc.default_authority): the daemon must accept what gRPC's C core sends. Prints one
"step: ..." line per check and exits non-zero at the first failure.
"""

import sys
import urllib.request

import grpc

target, stubs, tag = sys.argv[1], sys.argv[2], sys.argv[3]
tls = sys.argv[4:7]
sys.path.insert(0, stubs)
from hearth.v1 import hearth_pb2 as pb  # noqa: E402
from hearth.v1 import hearth_pb2_grpc as rpc  # noqa: E402


def step(text):
    print("step: " + text, flush=True)


def read(path):
    with open(path, "rb") as f:
        return f.read()


if tls:
    ca, cert, key = (read(p) for p in tls)
    # Without a client certificate the daemon refuses the connection.
    anonymous = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
    try:
        rpc.NodeServiceStub(anonymous).GetNode(pb.GetNodeRequest(), timeout=10)
        raise AssertionError("a client without a certificate was served")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        step("TLS without a client certificate: refused (%s)" % e.code())
    anonymous.close()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    channel = grpc.secure_channel(target, credentials)
else:
    channel = grpc.insecure_channel(target)
machines = rpc.MachineServiceStub(channel)
node = rpc.NodeServiceStub(channel)
registry = rpc.RegistryServiceStub(channel)


info = node.GetNode(pb.GetNodeRequest(), timeout=10)
assert info.version, info
step("GetNode answered, version " + info.version)

request = pb.CreateMachineRequest(
    request_id=tag + "-1",
    name=tag + "-web",
    spec=pb.MachineSpec(image="demo", vcpus=1, memory_mib=128, ports=[80]),
)
first = machines.CreateMachine(request, timeout=30)
again = machines.CreateMachine(request, timeout=30)
assert first.id and first.id == again.id, (first.id, again.id)
step("CreateMachine twice with one request id: one machine " + first.id)

waited = machines.WaitMachine(
    pb.WaitMachineRequest(id=first.id, state=pb.MACHINE_STATE_STARTED, timeout_ms=120000), timeout=130
)
assert waited.reached, waited
ip = waited.machine.guest_ip
step("WaitMachine: started at " + ip)

# Straight to the guest, never through a proxy the environment may name.
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
page = direct.open("http://%s:80/" % ip, timeout=10).read()
assert page, "an empty page"
step("the guest's page over HTTP: %d bytes" % len(page))

routes = registry.ListRoutes(pb.ListRoutesRequest(), timeout=10).routes
assert any(r.machine_id == first.id and r.ip == ip and 80 in r.ports for r in routes), routes
step("ListRoutes has the machine's route")

try:
    machines.CreateMachine(
        pb.CreateMachineRequest(
            request_id=tag + "-2",
            name="Not A Label",
            spec=pb.MachineSpec(image="demo", vcpus=1, memory_mib=128),
        ),
        timeout=10,
    )
    raise AssertionError("a bad name was accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert "name" in e.details(), e.details()
    step("bad input: INVALID_ARGUMENT naming the field: " + e.details())

machines.DestroyMachine(pb.MachineRef(id=first.id), timeout=30)
gone = machines.WaitMachine(
    pb.WaitMachineRequest(id=first.id, state=pb.MACHINE_STATE_DESTROYED, timeout_ms=120000), timeout=130
)
assert gone.reached, gone
routes = registry.ListRoutes(pb.ListRoutesRequest(), timeout=10).routes
assert all(r.machine_id != first.id for r in routes), routes
step("DestroyMachine: destroyed, route gone")
print("python-client: ok")
