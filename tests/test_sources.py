"""Opening corpora (moejax/data/sources.py): any TFDS dataset prepared in data_dir, by its
text key."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from moejax import data
from moejax.errors import ConfigError
from tests.corpora import all_rows, make_cfg, reconstruct, synthetic_documents


class MoejaxToyCorpus(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset standing in for any prepared one (e.g. lm1b)."""

    VERSION = tfds.core.Version('0.1.0')
    code_path = epath.Path(__file__)
    DOCS = {'train': synthetic_documents(120, seed=3), 'test': synthetic_documents(30, seed=4)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {'content': tfds.features.Text(), 'id': np.int64}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.DOCS}

    def _generate_examples(self, split):
        for i, text in enumerate(self.DOCS[split]):
            yield f'{split}{i}', {'content': text, 'id': i}


def test_any_prepared_tfds_dataset(tmp_path):
    builder = MoejaxToyCorpus(data_dir=str(tmp_path / 'tfds'), file_format='array_record')
    builder.download_and_prepare()
    cfg = make_cfg(tmp_path, name='moejax_toy_corpus', text_key='content', seq_len=32)
    data.check_data(cfg)
    tokenizer = data.get_tokenizer(cfg)
    for split in ('train', 'test'):
        found = reconstruct(all_rows(data.eval_batches(cfg, tokenizer, split)), tokenizer)
        assert sorted(found) == sorted(MoejaxToyCorpus.DOCS[split])
    with pytest.raises(ConfigError, match='split'):
        data.eval_batches(cfg, tokenizer, 'validation')
    cfg.data.text_key = 'body'
    with pytest.raises(ConfigError, match='data.text_key'):
        data.eval_batches(cfg, tokenizer, 'test')
