"""Open any corpus as `Documents`: python_stdlib (stdlib_corpus.py), text_files (text_files.py),
or a registered TFDS dataset already prepared in data_dir (read as an array_record data source;
nothing is downloaded at run time).

tensorflow_datasets (which stdlib_corpus imports) is imported only where a builder is looked up,
built or read: its 0.2 s would otherwise delay every command's start, config errors included.
"""
from moejax import errors
from moejax.data import corpus, text_files
from moejax.data.corpus import Documents
from moejax.errors import ConfigError


def check_tfds_name(name: str) -> None:
    """ConfigError unless name is a registered TFDS dataset (config/version suffixes allowed)."""
    import tensorflow_datasets as tfds
    base = name.split('/')[0].split(':')[0]
    try:
        tfds.builder_cls(base)
    except Exception:  # DatasetNotFoundError, or a malformed name
        raise ConfigError('data.name', name, 'use python_stdlib, text_files, or a registered '
                          'TFDS dataset name (e.g. lm1b) prepared in data.data_dir') from None


def tfds_builder(cfg):
    """The prepared TFDS builder for cfg.data.name (python_stdlib is prepared here on first
    use)."""
    import tensorflow_datasets as tfds

    from moejax.data import stdlib_corpus  # also turns TFDS's progress bars off, for any dataset
    name = cfg.data.name
    if name == 'python_stdlib':
        return stdlib_corpus.prepared_stdlib_builder(cfg)
    check_tfds_name(name)
    try:
        with errors.quiet():
            builder = tfds.builder(name, data_dir=corpus.data_dir(cfg))
            prepared = builder.is_prepared()
    except Exception as e:  # e.g. an unknown config or version in 'name/config:version'
        raise ConfigError('data.name', name, str(e).splitlines()[0][:200]) from None
    if not prepared:
        where = corpus.data_dir(cfg)
        raise ConfigError('data.name', name, f'is not prepared in {where} and nothing is '
                          'downloaded at run time; prepare it first, e.g. `tfds build '
                          f'{name} --data_dir={where} --file_format=array_record`')
    return builder


def _record_text(record, text_key: str) -> str:
    for part in text_key.split('/'):  # 'a/b' reaches a nested feature
        record = record[part]
    return record.decode('utf-8') if isinstance(record, bytes) else str(record)


def _check_text_key(builder, text_key: str) -> None:
    features = builder.info.features
    for part in text_key.split('/'):
        if not hasattr(features, 'keys') or part not in features.keys():
            raise ConfigError('data.text_key', text_key, f'{builder.name} has the features '
                              f'{sorted(builder.info.features.keys())}')
        features = features[part]


def open_tfds(cfg, split: str) -> Documents:
    """A TFDS split (e.g. 'validation' or 'train[:10%]') read as an array_record data source."""
    builder = tfds_builder(cfg)
    splits = sorted(builder.info.splits.keys())
    if split.split('[')[0] not in splits:
        raise ConfigError('split', split, f'{builder.name} has the splits {", ".join(splits)}')
    text_key = 'text' if cfg.data.name == 'python_stdlib' else cfg.data.get('text_key', 'text')
    _check_text_key(builder, text_key)
    try:
        source = builder.as_data_source(split)
    except Exception as e:
        raise ConfigError('data.name', cfg.data.name, 'cannot be read as a random-access data '
                          'source; prepare it with file_format=array_record '
                          f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
    fetch = lambda indices: [_record_text(r, text_key) for r in source.__getitems__(indices)]
    # The stdlib corpus is named by its content's digest: caches built from another never apply.
    name = f'python_stdlib-{_stdlib_digest()[:16]}' \
        if cfg.data.name == 'python_stdlib' else builder.info.full_name.replace('/', '-')
    return Documents(name + '-' + text_key.replace('/', '.'), len(source), fetch)


def open_split(cfg, split: str) -> Documents:
    """The documents of one split of cfg.data.name."""
    if cfg.data.name == 'text_files':
        return text_files.open_text_files(cfg, split)
    return open_tfds(cfg, split)


def describe(cfg) -> str:
    """The corpus in a few words, for the start banner (python_stdlib: with its digest)."""
    d = cfg.data
    if d.name == 'python_stdlib':
        return f'python_stdlib (digest {_stdlib_digest()[:16]})'
    if d.name == 'text_files':
        return f'text_files {d.text_glob!r} (a document per {d.text_format[:-1]})'
    return f'TFDS {d.name}'


def _stdlib_digest() -> str:
    from moejax.data import stdlib_corpus
    return stdlib_corpus.stdlib_manifest().digest
