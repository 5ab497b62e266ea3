"""What the task tests share."""


def everything(data):
    return data.train + data.valid + data.test
