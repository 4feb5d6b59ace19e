"""Reading what an offline W&B run wrote, without W&B's own reader."""

import struct


def read_wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` transaction log.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's last < 7 bytes are padding.
    """
    from wandb.proto import wandb_internal_pb2

    data, block, position, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records
