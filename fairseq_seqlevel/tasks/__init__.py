from fairseq_seqlevel.tasks import seqlevel_translation  # noqa: F401
