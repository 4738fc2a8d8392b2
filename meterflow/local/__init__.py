"""The local stack: a real Kafka broker (KRaft), Postgres and a Flink session cluster on this machine.

One module per part: ``kafka``, ``postgres``, ``zookeeper`` (Flink's high availability), ``flink`` (with ``flink_jobs``, which submits and
watches jobs on it), ``prometheus`` and ``stripe_mock``; ``base`` holds what they share (paths,
ports, pid files) and ``stack`` starts and stops them together.

Everything lives under one project-local state directory (``stack.state_dir``, default ``.stack``)::

    .stack/secrets.env             generated Postgres password (0600)
    .stack/kafka/                  server.properties, data/, kafka.log, kafka.pid
    .stack/postgres/               data/ (owned by the postgres user), postgres.log, socket
    .stack/zookeeper/              zoo.cfg, data/, port, zookeeper.log, zookeeper.pid
    .stack/flink/                  conf/, lib/, log/, pid/, checkpoints/, savepoints/, ha/
    .stack/prometheus/             prometheus.yml, data/, prometheus.log (meterflow/local/prometheus.py)
    .stack/stripe-mock/            stripe-mock.log, stripe-mock.pid

Jars come from ``scripts/setup.sh`` (Maven Central via ``third_party/*/pom.xml``); Postgres from Debian's
package; Flink is the distribution inside the ``apache-flink`` wheel. ``up`` is idempotent and
waits until each part answers.
"""
