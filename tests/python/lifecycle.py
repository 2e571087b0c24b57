"""A control plane written in Python drives a machine's life through hearthd's socket.

Run by tests/python_client.rs as: python lifecycle.py SOCKET STUBS_DIR. The stubs are
generated from proto/ by grpc_tools.protoc at test time. The channel uses grpcio's default
settings (no grpc.default_authority): the daemon must accept what gRPC's C core sends.
Prints one "step: ..." line per check and exits non-zero at the first failure.
"""

import sys
import urllib.request

import grpc

socket_path, stubs = sys.argv[1], sys.argv[2]
sys.path.insert(0, stubs)
from hearth.v1 import hearth_pb2 as pb  # noqa: E402
from hearth.v1 import hearth_pb2_grpc as rpc  # noqa: E402

channel = grpc.insecure_channel("unix:" + socket_path)
machines = rpc.MachineServiceStub(channel)
node = rpc.NodeServiceStub(channel)
registry = rpc.RegistryServiceStub(channel)


def step(text):
    print("step: " + text, flush=True)


info = node.GetNode(pb.GetNodeRequest(), timeout=10)
assert info.version, info
step("GetNode answered, version " + info.version)

request = pb.CreateMachineRequest(
    request_id="py-1",
    name="py-web",
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
            request_id="py-2",
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
