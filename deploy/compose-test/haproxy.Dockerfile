# A stand-in for haproxy:2.8, built offline by scripts/compose-test from
# warren-base:bookworm and Debian's haproxy (2.6). Like the official image it
# reads /usr/local/etc/haproxy/haproxy.cfg (docker-compose.yml mounts
# deploy/haproxy.cfg there), runs as the haproxy user in the foreground
# (master-worker, -db) and stops gracefully on SIGUSR1.
FROM warren-base:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/etc/haproxy /var/lib/haproxy \
 && chown haproxy:haproxy /var/lib/haproxy
USER haproxy
WORKDIR /var/lib/haproxy
STOPSIGNAL SIGUSR1
ENTRYPOINT ["haproxy", "-W", "-db"]
CMD ["-f", "/usr/local/etc/haproxy/haproxy.cfg"]
