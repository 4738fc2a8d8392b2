package dev.meterflow.metrics;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.InputStream;
import java.net.HttpURLConnection;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.URL;
import java.nio.charset.StandardCharsets;

import org.apache.flink.metrics.MetricConfig;
import org.junit.jupiter.api.Test;

/** The loopback reporter serves on the configured host and skips ports that are taken. */
class LoopbackPrometheusReporterFactoryTest {

    private static LoopbackPrometheusReporterFactory.Reporter create(String ports) {
        MetricConfig config = new MetricConfig();
        config.setProperty("port", ports);
        return new LoopbackPrometheusReporterFactory().createMetricReporter(config);
    }

    private static int freePort() throws Exception {
        try (ServerSocket s = new ServerSocket(0, 1, InetAddress.getLoopbackAddress())) {
            return s.getLocalPort();
        }
    }

    @Test
    void servesOnLoopbackAndSkipsTakenPorts() throws Exception {
        try (ServerSocket taken = new ServerSocket()) {
            taken.bind(new InetSocketAddress("127.0.0.1", 0));
            int free = freePort();
            LoopbackPrometheusReporterFactory.Reporter reporter = create(taken.getLocalPort() + "," + free);
            try {
                assertEquals(free, reporter.getPort(), "the taken port is skipped");
                HttpURLConnection c = (HttpURLConnection) new URL("http://127.0.0.1:" + free + "/metrics").openConnection();
                assertEquals(200, c.getResponseCode());
                try (InputStream body = c.getInputStream()) {
                    new String(body.readAllBytes(), StandardCharsets.UTF_8);
                }
                // Another loopback address on the same port is still free: the reporter holds
                // 127.0.0.1 only (a wildcard bind would hold every address).
                try (ServerSocket probe = new ServerSocket()) {
                    probe.bind(new InetSocketAddress("127.0.0.2", free));
                    assertTrue(probe.isBound());
                }
            } finally {
                reporter.close();
            }
        }
    }

    @Test
    void failsWhenEveryPortIsTaken() throws Exception {
        try (ServerSocket taken = new ServerSocket()) {
            taken.bind(new InetSocketAddress("127.0.0.1", 0));
            assertThrows(IllegalStateException.class, () -> create(String.valueOf(taken.getLocalPort())));
        }
    }
}
