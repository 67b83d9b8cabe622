# kube-proxy (Python) node image: a drop-in for the upstream kube-proxy image.
#
# The kubeadm DaemonSet runs
#   command: [/usr/local/bin/kube-proxy, --config=/var/lib/kube-proxy/config.conf, --hostname-override=$(NODE_NAME)]
# and the older cluster/addons manifests run `/bin/sh -c "kube-proxy ..."`: both work unchanged because the
# console script is installed at /usr/local/bin/kube-proxy (on PATH) and the base image has /bin/sh.
#
#   docker build -t ghcr.io/kubeproxy-py/kube-proxy:0.1.0 .
#
# Runs as root on purpose (no USER): the proxy programs nftables and conntrack (CAP_NET_ADMIN), sets
# net.* sysctls (CAP_NET_ADMIN / CAP_SYS_ADMIN) and may load modules (CAP_SYS_MODULE); the DaemonSet
# decides which capabilities the container really gets (deploy/daemonset.yaml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project wheel plus the exact dependency set from uv.lock, as wheels ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_PYTHON_DOWNLOADS=never
# uv reads uv.lock (the version that wrote it or newer) and exports it with hashes.
RUN pip install "uv>=0.13.8,<1"
WORKDIR /src
# Lock + metadata first so the dependency layer is cached across source-only changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv export --frozen --no-dev --no-emit-project --format requirements-txt -o /tmp/requirements.txt \
 && pip wheel --require-hashes --no-deps -r /tmp/requirements.txt -w /wheels
COPY src ./src
RUN uv build --wheel --out-dir /wheels

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kube-proxy (Python)" \
      org.opencontainers.image.description="Kubernetes Services and EndpointSlices to nftables rules; drop-in for kube-proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# The data path's tools: nft (nftables), conntrack (UDP flow cleanup), iproute2 (addresses, routes),
# iptables and ipset (the iptables/IPVS modes and `--cleanup` of their rules). Debian bookworm's
# `iptables` is the nf_tables variant by default (update-alternatives selects -nft or -legacy).
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables conntrack ipset iproute2 \
 && rm -rf /var/lib/apt/lists/*
# Only locked wheels from the build stage, no index: the image holds exactly what uv.lock says.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && test -x /usr/local/bin/kube-proxy \
 && /usr/local/bin/kube-proxy --version
ENTRYPOINT ["/usr/local/bin/kube-proxy"]
