-- Change tracking (issue 3): what the agent recorded about each disk stream of
-- a point (RCT change-tracking id, DataWriteGuid) and which point it was a
-- delta against. Written just before the point's commit transaction; a row
-- whose point never became visible is inert (only looked up by point id).
CREATE TABLE point_tracking (
    point_id        TEXT NOT NULL,
    stream_no       INTEGER NOT NULL,
    change_id       TEXT,
    data_write_guid TEXT,
    base_point      TEXT,
    PRIMARY KEY (point_id, stream_no)
);
