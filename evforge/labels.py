"""Label sets of the datasets evforge converts: class names and sensor sizes that both the converters (writing
manifests) and the training side (reading them, or falling back without one) need, low in the flow so that
neither imports the other."""

from __future__ import annotations

__all__ = ["DSEC_SENSOR_SIZE", "DSEC_LABEL_CLASSES", "DSEC_CLASSES"]

DSEC_SENSOR_SIZE = (640, 480)  # (width, height) of DSEC's event cameras
# DSEC-Semantic's label sets (the converter's --label-set); 255 is "ignore" in both
DSEC_LABEL_CLASSES = {
    "11classes": ["background", "building", "fence", "person", "pole", "road", "sidewalk", "vegetation", "car",
                  "wall", "traffic sign"],
    "19classes": ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                  "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                  "bicycle"],
}
DSEC_CLASSES = DSEC_LABEL_CLASSES["11classes"]  # ECDDP's protocol: the 11 classes
