"""Dataset adapters: a source in, canonical events/items/users tables out."""

from recflow.datasets.ingest import ingest
from recflow.datasets.validation import IngestError, IngestReport, TableReport

__all__ = ["ingest", "IngestError", "IngestReport", "TableReport"]
