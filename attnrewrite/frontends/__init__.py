"""Front ends: one per way a model reaches the tool (export, onnx, dynamo), one interface.

`base.FrontEnd` is the interface the pipeline drives; each module here implements it for
one kind of program and knows nothing of the others.
"""
