# A stand-in for rabbitmq:3.13-management, built offline by scripts/compose-test
# from warren-base:bookworm (debootstrap) and Debian's rabbitmq-server (3.10).
# It does what docker-compose.yml needs of the official image: AMQP on 5672 on
# every interface, guest able to log in from other containers, the management
# plugin, `rabbitmq-diagnostics -q ping` for the healthcheck, logs on stdout, and
# a node named after the container's hostname (rabbit@rabbitmq).
FROM warren-base:bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management
COPY rabbitmq.conf /etc/rabbitmq/rabbitmq.conf
EXPOSE 4369 5671 5672 15672 25672
# Debian's /usr/sbin/rabbitmq-server runs the broker as the rabbitmq user, in the
# foreground.
CMD ["rabbitmq-server"]
