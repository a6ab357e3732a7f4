"""The gRPC server's security: bearer tokens, the admin token, allowed adapter directories, TLS and mTLS.

Same set-up as `test_server.py` (a real server on loopback over a tiny random Llama). Paths are
attacked with `..`, absolute paths and symlinks out of the allowed directory; a corrupt and a
wrong-base adapter must be refused while the server keeps serving. Certificates are made here
with `cryptography`: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
and a second CA whose client certificate the server must refuse.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from quadapt.runtime.serving.client import Client, ServerError
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.serving.server import ServerConfig, read_secret
from quadapt.runtime.serving.security import Refusal, authorize
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_base, make_peft_adapter
from .test_server import GREEDY, ServerThread, make_engine

USER, ADMIN = "user-token-123", "admin-token-456"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("secure-base"))


@pytest.fixture(scope="module")
def tokenizer(base) -> Tokenizer:
    return Tokenizer.from_dir(base)


@pytest.fixture(scope="module")
def dirs(base, tmp_path_factory) -> SimpleNamespace:
    """allowed/{good, corrupt, wrong-base, inner-link -> good, escape -> outside/evil}, outside/evil."""
    root = tmp_path_factory.mktemp("secure-dirs")
    allowed, outside = root / "allowed", root / "outside"
    good = make_peft_adapter(base, allowed / "good", seed=4, config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    shutil.copytree(good, outside / "evil")
    shutil.copytree(good, allowed / "corrupt")
    weights = allowed / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    shutil.copytree(good, allowed / "wrong-base")
    weights = allowed / "wrong-base" / "adapter_model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if "lora_A" in key:  # [r, in] of a base with a wider hidden size
            tensors[key] = tensors[key].new_zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, weights)
    (allowed / "inner-link").symlink_to(allowed / "good")
    (allowed / "escape").symlink_to(outside / "evil")
    return SimpleNamespace(root=root, allowed=allowed, outside=outside)


@pytest.fixture(scope="module")
def secured(base, tokenizer, dirs):
    config = ServerConfig(model=str(base), port=0, adapter_dirs=(str(dirs.allowed),), token=USER, admin_token=ADMIN)
    server = ServerThread(config, AsyncLLM.from_engine(make_engine(base, {}, tokenizer), tokenizer))
    yield server
    server.close()


def code_of(call) -> str:
    with pytest.raises(ServerError) as refused:
        call()
    return refused.value.code


def test_tokens(secured):
    with secured.client() as anonymous, secured.client(token="wrong") as wrong:
        assert anonymous.health() == "SERVING"  # probes need no token
        for client in (anonymous, wrong):
            assert code_of(lambda: client.generate("hi", **GREEDY)) == "UNAUTHENTICATED"
            assert code_of(client.list_adapters) == "UNAUTHENTICATED"
            assert code_of(lambda: client.load_adapter("x", "good")) == "UNAUTHENTICATED"
    with secured.client(token=USER) as user:
        assert user.generate("hi", **GREEDY).completion_tokens == 8
        assert code_of(lambda: user.load_adapter("x", "good")) == "PERMISSION_DENIED"
        assert code_of(lambda: user.unload_adapter("x")) == "PERMISSION_DENIED"
    with secured.client(token=ADMIN) as admin:
        assert admin.generate("hi", **GREEDY).completion_tokens == 8  # the admin token passes everywhere
    from quadapt.protos.quadapt.v1 import generation_pb2 as pb
    from quadapt.protos.quadapt.v1 import generation_pb2_grpc as pb_grpc
    import grpc

    with grpc.insecure_channel(secured.target) as channel:  # another scheme is no token
        with pytest.raises(grpc.RpcError) as basic:
            pb_grpc.GenerationStub(channel).ServerInfo(pb.ServerInfoRequest(), metadata=[("authorization", f"Basic {USER}")])
        assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("token", "admin_token", "presented", "admin", "expected"),
    [
        (None, None, None, True, None),  # no tokens: open
        (USER, None, USER, True, None),  # no admin token: admin RPCs take the user token
        (USER, None, None, False, "UNAUTHENTICATED"),
        (None, ADMIN, None, False, None),  # only an admin token: generation is open
        (None, ADMIN, USER, True, "UNAUTHENTICATED"),
        (USER, ADMIN, USER, True, "PERMISSION_DENIED"),
        (USER, ADMIN, ADMIN, True, None),
    ],
)
def test_token_matrix(token, admin_token, presented, admin, expected):
    metadata = [("authorization", f"Bearer {presented}")] if presented else []
    if expected is None:
        authorize(metadata, token, admin_token, admin=admin)
    else:
        with pytest.raises(Refusal) as refused:
            authorize(metadata, token, admin_token, admin=admin)
        assert refused.value.code.name == expected


def test_adapter_paths_stay_inside_the_allowed_dirs(secured, dirs):
    with secured.client(token=ADMIN) as admin:
        assert admin.load_adapter("good", "good")[1] == "LOADED"
        assert admin.load_adapter("good", str(dirs.allowed / "good"))[1] == "UNCHANGED"
        assert admin.load_adapter("linked", "inner-link")[1] == "LOADED"  # a symlink that stays inside is fine
        for path in ("../outside/evil", str(dirs.outside / "evil"), str(dirs.allowed / ".." / "outside" / "evil"),
                     "escape", str(dirs.allowed / "escape"), "/etc", ""):
            with pytest.raises(ServerError) as refused:
                admin.load_adapter("evil", path)
            assert refused.value.code == ("INVALID_ARGUMENT" if path == "" else "PERMISSION_DENIED"), path
            if path:
                assert "outside the server's adapter directories" in refused.value.details
        assert [a.name for a in admin.list_adapters()] == ["good", "linked"]
        assert admin.generate("hi", adapter="good", **GREEDY).completion_tokens == 8


def test_bad_adapters_are_refused_and_the_server_keeps_serving(secured):
    with secured.client(token=ADMIN) as admin:
        for path, message in (("corrupt", "truncated or corrupt"), ("wrong-base", "shape"), ("missing", "not a directory")):
            with pytest.raises(ServerError, match=message) as refused:
                admin.load_adapter("bad", path)
            assert refused.value.code == "FAILED_PRECONDITION", path
        assert code_of(lambda: admin.load_adapter("bad name!", "good")) == "INVALID_ARGUMENT"
        assert "bad" not in [a.name for a in admin.list_adapters()]
        assert admin.generate("still here", **GREEDY).completion_tokens == 8
        assert admin.health() == "SERVING"


def test_config_and_secret_checks(tmp_path, base):
    for kwargs, message in (
        (dict(tls_cert="c.pem"), "tls_cert and tls_key go together"),
        (dict(tls_client_ca="ca.pem"), "needs the server's own tls_cert"),
        (dict(token=USER, admin_token=USER), "the same"),
        (dict(token=" padded "), "whitespace"),
        (dict(port=70000), "port"),
        (dict(max_queue=0), "max_queue"),
    ):
        with pytest.raises(InvalidParameterError, match=message):
            ServerConfig(model=str(base), **kwargs)
    assert USER not in repr(ServerConfig(model=str(base), token=USER))  # secrets stay out of logs
    secret = tmp_path / "token"
    secret.write_text(f"{USER}\n")
    assert read_secret(secret) == USER
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidParameterError, match="empty"):
        read_secret(tmp_path / "empty")


# -- TLS ------------------------------------------------------------------------------------


def _certificate(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256()), name


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> SimpleNamespace:
    """ca.pem; server.pem/key (signed by ca); client.pem/key (signed by ca); rogue.pem/key (its own CA)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = tmp_path_factory.mktemp("certs")

    def write(stem: str, cert, key) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca, ca_name = _certificate("quadapt test CA", ca_key, None, None, ca=True)
    write("ca", ca, ca_key)
    for stem, signer in (("server", (ca_name, ca_key)), ("client", (ca_name, ca_key)), ("rogue", (None, None))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert, _ = _certificate(f"quadapt {stem}", key, *signer, server=stem == "server")
        write(stem, cert, key)
    return SimpleNamespace(**{p.stem + "_" + p.suffix[1:]: str(p) for p in out.iterdir()})


def tls_server(base, tokenizer, certs, *, mutual: bool) -> ServerThread:
    config = ServerConfig(model=str(base), port=0, tls_cert=certs.server_pem, tls_key=certs.server_key,
                          tls_client_ca=certs.ca_pem if mutual else None)
    return ServerThread(config, AsyncLLM.from_engine(make_engine(base, {}, tokenizer), tokenizer))


def test_tls(base, tokenizer, certs):
    served = tls_server(base, tokenizer, certs, mutual=False)
    try:
        with Client(served.target, ca_cert=certs.ca_pem, timeout=10) as client:
            assert client.generate("over TLS", **GREEDY).completion_tokens == 8
        with Client(served.target, timeout=5) as plaintext:
            assert code_of(lambda: plaintext.generate("hi", **GREEDY)) == "UNAVAILABLE"
        with Client(served.target, ca_cert=certs.rogue_pem, timeout=5) as untrusting:  # the server's CA is not trusted
            assert code_of(lambda: untrusting.generate("hi", **GREEDY)) == "UNAVAILABLE"
    finally:
        served.close()


def test_mutual_tls(base, tokenizer, certs):
    served = tls_server(base, tokenizer, certs, mutual=True)
    try:
        with Client(served.target, ca_cert=certs.ca_pem, client_cert=certs.client_pem, client_key=certs.client_key,
                    timeout=10) as client:
            assert client.generate("over mTLS", **GREEDY).completion_tokens == 8
        with Client(served.target, ca_cert=certs.ca_pem, timeout=5) as anonymous:
            assert code_of(lambda: anonymous.generate("hi", **GREEDY)) == "UNAVAILABLE"
        with Client(served.target, ca_cert=certs.ca_pem, client_cert=certs.rogue_pem, client_key=certs.rogue_key,
                    timeout=5) as rogue:
            assert code_of(lambda: rogue.generate("hi", **GREEDY)) == "UNAVAILABLE"
    finally:
        served.close()
