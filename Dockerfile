# The chaos agent image (also carries the `aftershock` CLI).
FROM python:3.11-slim-bookworm

# nftables for partition and proxy-latency rules, iproute2 for operators who
# exec in to look; pyroute2 talks netlink itself.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 procps \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY chaos_agent ./chaos_agent
COPY coordinator ./coordinator
COPY token_bucket ./token_bucket
RUN pip install --no-cache-dir . && rm -rf /src

# Journal lives on a hostPath volume (see deploy/daemonset.yaml).
VOLUME ["/var/lib/aftershock"]
EXPOSE 9464
ENTRYPOINT ["chaos-agent"]
CMD ["run"]
