"""Cache the scorer crops of cv200 for scorer_ab.py: python docs/experiments/scorer_crops.py {repeat|adjacent} {none|MM}"""
import sys, pickle, numpy as np, pandas as pd
from concurrent.futures import ProcessPoolExecutor
from lumbar_ray.metrics.labels import read_labels, read_coordinates, labelled_points
from lumbar_ray.training.examples import study_examples
from lumbar_ray.config import ScorerConfig
R = "cv200"  # lumbar-ray synth --out cv200 --studies 200 --seed 2024 --size small
channels, mm = sys.argv[1], (None if sys.argv[2] == "none" else float(sys.argv[2]))
pts = labelled_points(read_labels(R), read_coordinates(R))
def one(sid):
    ex = study_examples(R, sid, pts[pts.study_id == sid], ScorerConfig(channels=channels, crop_mm=mm), with_slices=False)
    return ex.crops, ex.points
if __name__ == "__main__":
    with ProcessPoolExecutor(2) as ex:
        res = list(ex.map(one, sorted(pts.study_id.unique())))
    crops = np.concatenate([r[0] for r in res]); points = pd.concat([r[1] for r in res], ignore_index=True)
    import os; os.makedirs("work/experiments", exist_ok=True)
    pickle.dump((crops, points), open(f"work/experiments/crops_{channels}_{sys.argv[2]}.pkl", "wb"))
    print(crops.shape, points.label.value_counts().to_dict())
