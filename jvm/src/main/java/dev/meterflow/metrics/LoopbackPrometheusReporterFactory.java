package dev.meterflow.metrics;

import java.io.IOException;
import java.lang.reflect.Field;
import java.net.InetSocketAddress;
import java.util.Iterator;
import java.util.Properties;

import io.prometheus.client.CollectorRegistry;
import io.prometheus.client.exporter.HTTPServer;
import org.apache.flink.metrics.MetricConfig;
import org.apache.flink.metrics.prometheus.AbstractPrometheusReporter;
import org.apache.flink.metrics.reporter.MetricReporterFactory;
import org.apache.flink.util.PortRange;

/**
 * Flink's Prometheus reporter, serving on one host address instead of every interface.
 *
 * <p>The stock {@code PrometheusReporterFactory} (flink-metrics-prometheus 2.3) binds its HTTP server
 * to the wildcard address and has no host option. This factory keeps its metric naming and labels
 * (it extends the same {@link AbstractPrometheusReporter}) and binds to {@code host} (default
 * {@code 127.0.0.1}), trying the ports of {@code port} (a Flink port range) in order, like the
 * stock reporter.
 *
 * <pre>
 * metrics.reporter.prom.factory.class: dev.meterflow.metrics.LoopbackPrometheusReporterFactory
 * metrics.reporter.prom.host: 127.0.0.1
 * metrics.reporter.prom.port: 9249-9252
 * </pre>
 */
public class LoopbackPrometheusReporterFactory implements MetricReporterFactory {

    static final String ARG_HOST = "host";
    static final String ARG_PORT = "port";
    static final String DEFAULT_HOST = "127.0.0.1";
    static final String DEFAULT_PORT = "9249";

    @Override
    public Reporter createMetricReporter(Properties properties) {
        MetricConfig config = (MetricConfig) properties;
        String host = config.getString(ARG_HOST, DEFAULT_HOST);
        return new Reporter(host, new PortRange(config.getString(ARG_PORT, DEFAULT_PORT)));
    }

    /** The reporter: Flink's Prometheus collectors, served on host:port. */
    public static class Reporter extends AbstractPrometheusReporter {
        private final HTTPServer httpServer;
        private final int port;

        Reporter(String host, PortRange ports) {
            CollectorRegistry registry = registryOf(this);
            HTTPServer server = null;
            int bound = -1;
            Iterator<Integer> candidates = ports.getPortsIterator();
            while (server == null && candidates.hasNext()) {
                int candidate = candidates.next();
                try {
                    server = new HTTPServer(new InetSocketAddress(host, candidate), registry, true);
                    bound = candidate;
                } catch (IOException e) { // taken: try the next port
                    log.debug("Could not start the Prometheus endpoint on {}:{}.", host, candidate, e);
                }
            }
            if (server == null) {
                throw new IllegalStateException("Could not start the Prometheus endpoint on " + host + " on any port of " + ports);
            }
            httpServer = server;
            port = bound;
            log.info("Started the Prometheus endpoint on {}:{}.", host, port);
        }

        /** The port this reporter serves on. */
        public int getPort() {
            return port;
        }

        @Override
        public void close() {
            httpServer.stop();
            super.close();
        }

        /** The reporter's own registry: a package-private field of the base class, the one its collectors register in. */
        private static CollectorRegistry registryOf(AbstractPrometheusReporter reporter) {
            try {
                Field field = AbstractPrometheusReporter.class.getDeclaredField("registry");
                field.setAccessible(true);
                return (CollectorRegistry) field.get(reporter);
            } catch (ReflectiveOperationException | ClassCastException e) {
                throw new IllegalStateException("flink-metrics-prometheus changed: AbstractPrometheusReporter.registry not found", e);
            }
        }
    }
}
