# An upstream-style data/dataset_info.py (UniMedVL / BAGEL layout) over the shipped example, for
# jobs/import_legacy.py: it is read with `ast`, never executed or imported. Paths are relative to
# examples/radiology (pass --base examples/radiology).
from .interleave_datasets import MedicalImageEditingIterableDataset_ver1, UnifiedEditIterableDataset
from .t2i_dataset import T2IIterableDataset, T2IIterableDataset_Ver1
from .vlm_dataset import SftJSONLIterableDataset_Ver1, SftJSONLIterableDataset_TextOnly

DATASET_REGISTRY = {
    't2i_pretrain': T2IIterableDataset,
    'unified_edit': UnifiedEditIterableDataset,
    'medical_sft': SftJSONLIterableDataset_Ver1,
    'medical_text': SftJSONLIterableDataset_TextOnly,
    'medical_t2i': T2IIterableDataset_Ver1,
    'medical_edit': MedicalImageEditingIterableDataset_ver1,
}

DATASET_INFO = {
    't2i_pretrain': {
        't2i': {'data_dir': 'bagel_example/t2i', 'num_files': 10, 'num_total_samples': 1000},
    },
    'unified_edit': {
        'seedxedit_multi': {'data_dir': 'bagel_example/editing/seedxedit_multi', 'num_files': 10,
                            'parquet_info_path': 'bagel_example/editing/parquet_info/seedxedit_multi_nas.json'},
    },
    'medical_sft': {
        'ct_mr_vqa_train': {'data_dir': 'images', 'jsonl_path': 'annotations/ct_mr_vqa.jsonl'},
    },
    'medical_text': {
        'radiology_text_qa_val': {'jsonl_path': 'annotations/radiology_text_qa.jsonl'},
    },
    'medical_t2i': {
        'fundus_t2i': {'data_dir': 'images', 'jsonl_path': 'annotations/fundus_t2i.jsonl'},
    },
    'medical_edit': {
        'he_to_ihc_edit_test': {'data_dir': 'images', 'jsonl_path': 'annotations/he_to_ihc_edit.jsonl'},
    },
}
