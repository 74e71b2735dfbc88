"""One APIRouter per file: search, score, writes, ops."""
