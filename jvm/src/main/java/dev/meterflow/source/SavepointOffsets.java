package dev.meterflow.source;

import java.io.ByteArrayInputStream;
import java.io.DataInputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Map;
import java.util.TreeMap;

import org.apache.flink.api.common.typeutils.base.LongSerializer;
import org.apache.flink.api.common.typeutils.base.array.BytePrimitiveArraySerializer;
import org.apache.flink.core.fs.FSDataInputStream;
import org.apache.flink.core.io.SimpleVersionedSerialization;
import org.apache.flink.core.io.SimpleVersionedSerializer;
import org.apache.flink.core.memory.DataInputViewStreamWrapper;
import org.apache.flink.runtime.checkpoint.Checkpoints;
import org.apache.flink.runtime.checkpoint.OperatorState;
import org.apache.flink.runtime.checkpoint.OperatorSubtaskState;
import org.apache.flink.runtime.checkpoint.metadata.CheckpointMetadata;
import org.apache.flink.runtime.state.OperatorStateHandle;

/**
 * Where a usage job's savepoint left off. The offsets it holds for the Kafka source of one topic: per
 * partition, the next offset its reader would have read, so every record below it was read by the
 * job that wrote the savepoint. Unlike the consumer group's committed offsets, which Flink's Kafka
 * source commits after a checkpoint completes and may not commit for the savepoint a job stops with,
 * these are exactly where the job stopped.
 *
 * <p>Read from the source operator's split state ({@code SourceReaderState}, each split versioned
 * as Flink's Kafka source writes it, version 0: topic, partition, next offset, stopping offset).
 * A split that had not read since it was assigned holds a negative marker (the earliest, latest or
 * committed offset) and is left out: the caller takes the group's committed offset for it.
 *
 * <p>And the watermark its lateness decisions held ({@code HeldWatermark}'s union states
 * {@code held-watermark} and {@code closed-through}, the highest of each): windows it closed, with or
 * without a counted event, stay closed in the job that takes over.
 *
 * <p>Run as {@code java -cp <flink lib>:<this jar> dev.meterflow.source.SavepointOffsets <dir> <topic>}:
 * prints "partition P OFFSET" per partition, then "held-watermark MS" and "closed-through MS" if held.
 */
public final class SavepointOffsets {
    /** The source operator's list state of its readers' splits (Flink's SourceOperator). */
    static final String READER_STATE = "SourceReaderState";
    /** The union states of dev.meterflow.operators.HeldWatermark. */
    static final String HELD_WATERMARK = "held-watermark";
    static final String CLOSED_THROUGH = "closed-through";

    private SavepointOffsets() {}

    public static void main(String[] args) throws IOException {
        if (args.length != 2) {
            System.err.println("usage: SavepointOffsets <savepoint or checkpoint directory> <topic>");
            System.exit(2);
        }
        Path directory = Paths.get(args[0]);
        CheckpointMetadata metadata = metadata(directory);
        offsets(metadata, args[1]).forEach((partition, offset) -> System.out.println("partition " + partition + " " + offset));
        for (String name : new String[] {HELD_WATERMARK, CLOSED_THROUGH}) {
            Long held = highest(metadata, name);
            if (held != null) {
                System.out.println(name + " " + held);
            }
        }
    }

    /** Partition to the next offset to read, for every split of {@code topic} that had read. */
    public static Map<Integer, Long> read(Path directory, String topic) throws IOException {
        return offsets(metadata(directory), topic);
    }

    static CheckpointMetadata metadata(Path directory) throws IOException {
        try (DataInputStream in = new DataInputStream(Files.newInputStream(directory.resolve("_metadata")))) {
            return Checkpoints.loadCheckpointMetadata(in, SavepointOffsets.class.getClassLoader(), directory.toUri().toString());
        }
    }

    /** The highest value of the long list state {@code name} over every operator and subtask, null when none holds it. */
    static Long highest(CheckpointMetadata metadata, String name) throws IOException {
        Long highest = null;
        for (OperatorState operator : metadata.getOperatorStates()) {
            for (OperatorSubtaskState subtask : operator.getStates()) {
                for (OperatorStateHandle handle : subtask.getManagedOperatorState()) {
                    OperatorStateHandle.StateMetaInfo values = handle.getStateNameToPartitionOffsets().get(name);
                    if (values == null) {
                        continue;
                    }
                    try (FSDataInputStream in = handle.openInputStream()) {
                        DataInputViewStreamWrapper view = new DataInputViewStreamWrapper(in);
                        for (long at : values.getOffsets()) {
                            in.seek(at);
                            long value = LongSerializer.INSTANCE.deserialize(view);
                            highest = highest == null ? value : Math.max(highest, value);
                        }
                    }
                }
            }
        }
        return highest;
    }

    static Map<Integer, Long> offsets(CheckpointMetadata metadata, String topic) throws IOException {
        Map<Integer, Long> offsets = new TreeMap<>();
        for (OperatorState operator : metadata.getOperatorStates()) {
            for (OperatorSubtaskState subtask : operator.getStates()) {
                for (OperatorStateHandle handle : subtask.getManagedOperatorState()) {
                    OperatorStateHandle.StateMetaInfo splits = handle.getStateNameToPartitionOffsets().get(READER_STATE);
                    if (splits != null) {
                        readSplits(handle, splits, topic, offsets);
                    }
                }
            }
        }
        return offsets;
    }

    private static void readSplits(OperatorStateHandle handle, OperatorStateHandle.StateMetaInfo splits, String topic, Map<Integer, Long> offsets) throws IOException {
        try (FSDataInputStream in = handle.openInputStream()) {
            DataInputViewStreamWrapper view = new DataInputViewStreamWrapper(in);
            for (long at : splits.getOffsets()) {
                in.seek(at);
                Split split = SimpleVersionedSerialization.readVersionAndDeSerialize(Split.SERIALIZER, BytePrimitiveArraySerializer.INSTANCE.deserialize(view));
                if (split.topic.equals(topic) && split.nextOffset >= 0) {
                    offsets.merge(split.partition, split.nextOffset, Math::max);
                }
            }
        }
    }

    /** A Kafka split as the source's state holds it. */
    record Split(String topic, int partition, long nextOffset) {
        static final SimpleVersionedSerializer<Split> SERIALIZER = new SimpleVersionedSerializer<>() {
            @Override
            public int getVersion() {
                return 0;
            }

            @Override
            public byte[] serialize(Split split) {
                throw new UnsupportedOperationException("read only");
            }

            @Override
            public Split deserialize(int version, byte[] bytes) throws IOException {
                if (version != 0) {
                    throw new IOException("a Kafka split of version " + version + ": this reader knows version 0 (Flink's Kafka source changed its state format)");
                }
                try (DataInputStream in = new DataInputStream(new ByteArrayInputStream(bytes))) {
                    return new Split(in.readUTF(), in.readInt(), in.readLong());
                }
            }
        };
    }
}
