package dev.meterflow.source;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.common.typeutils.base.array.BytePrimitiveArraySerializer;
import org.apache.flink.core.io.SimpleVersionedSerialization;
import org.apache.flink.core.io.SimpleVersionedSerializer;
import org.apache.flink.runtime.checkpoint.Checkpoints;
import org.apache.flink.runtime.checkpoint.OperatorState;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.runtime.checkpoint.metadata.CheckpointMetadata;
import org.apache.flink.runtime.jobgraph.OperatorID;
import org.apache.flink.runtime.state.StateInitializationContext;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.streaming.util.OneInputStreamOperatorTestHarness;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Offsets read back from metadata Flink wrote, holding split state laid out as the Kafka source's. */
class SavepointOffsetsTest {
    /** The Kafka source's split format, version 0: topic, partition, next offset, stopping offset. */
    private static final SimpleVersionedSerializer<Object[]> KAFKA_SPLIT = new SimpleVersionedSerializer<>() {
        @Override
        public int getVersion() {
            return 0;
        }

        @Override
        public byte[] serialize(Object[] split) throws IOException {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream();
            try (DataOutputStream out = new DataOutputStream(bytes)) {
                out.writeUTF((String) split[0]);
                out.writeInt((Integer) split[1]);
                out.writeLong((Long) split[2]);
                out.writeLong(Long.MIN_VALUE);
            }
            return bytes.toByteArray();
        }

        @Override
        public Object[] deserialize(int version, byte[] serialized) {
            throw new UnsupportedOperationException();
        }
    };

    /** An operator holding the given splits in the source's reader state, as a source subtask does. */
    static final class HoldsSplits extends AbstractStreamOperator<String> implements OneInputStreamOperator<String, String> {
        private static final long serialVersionUID = 1L;
        private final ArrayList<byte[]> splits;
        private final long heldWatermark;

        HoldsSplits(List<byte[]> splits, long heldWatermark) {
            this.splits = new ArrayList<>(splits);
            this.heldWatermark = heldWatermark;
        }

        @Override
        public void initializeState(StateInitializationContext context) throws Exception {
            super.initializeState(context);
            ListState<byte[]> state = context.getOperatorStateStore().getListState(new ListStateDescriptor<>(SavepointOffsets.READER_STATE, BytePrimitiveArraySerializer.INSTANCE));
            state.update(splits);
            context.getOperatorStateStore().getUnionListState(new ListStateDescriptor<>(SavepointOffsets.HELD_WATERMARK, Types.LONG)).update(List.of(heldWatermark));
        }

        @Override
        public void processElement(StreamRecord<String> element) {}
    }

    private static byte[] split(String topic, int partition, long offset) throws IOException {
        return SimpleVersionedSerialization.writeVersionAndSerialize(KAFKA_SPLIT, new Object[] {topic, partition, offset});
    }

    private static OperatorSubtaskState snapshot(List<byte[]> splits, long heldWatermark) throws Exception {
        try (var h = new OneInputStreamOperatorTestHarness<String, String>(new HoldsSplits(splits, heldWatermark))) {
            h.open();
            return h.snapshot(1, 1);
        }
    }

    @Test
    void theNextOffsetOfEverySplitOfTheTopicAcrossSubtasks() throws Exception {
        OperatorState source = new OperatorState("source", "source", new OperatorID(), 2, 128);
        source.putState(0, snapshot(List.of(split("usage", 0, 10), split("usage", 1, 20), split("other", 0, 99)), 5_000L));
        // A split that had not read since it was assigned holds a marker (here the committed offset's, -3).
        source.putState(1, snapshot(List.of(split("usage", 2, 30), split("usage", 3, -3)), 7_000L));
        OperatorState other = new OperatorState("window", "window", new OperatorID(), 2, 128);
        CheckpointMetadata metadata = new CheckpointMetadata(7L, List.of(source, other), List.of());
        assertEquals(Map.of(0, 10L, 1, 20L, 2, 30L), SavepointOffsets.read(write(metadata), "usage"));
        assertEquals(Map.of(0, 99L), SavepointOffsets.read(write(metadata), "other"));
        // The watermark the job held: the highest of its subtasks'; a state nobody holds is null.
        CheckpointMetadata read = SavepointOffsets.metadata(write(metadata));
        assertEquals(7_000L, SavepointOffsets.highest(read, SavepointOffsets.HELD_WATERMARK));
        assertEquals(null, SavepointOffsets.highest(read, SavepointOffsets.CLOSED_THROUGH));
    }

    @TempDir
    Path dir;

    private Path write(CheckpointMetadata metadata) throws IOException {
        try (OutputStream out = Files.newOutputStream(dir.resolve("_metadata"))) {
            Checkpoints.storeCheckpointMetadata(metadata, out);
        }
        return dir;
    }
}
